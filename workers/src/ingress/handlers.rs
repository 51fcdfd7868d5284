//! What a consumed message becomes: the message, the handler trait and its errors, and the
//! built-in handlers (enqueue a job, send a signal, start a workflow) with their registry.
use super::*;

/// A consumed message, detached from the consumer.
#[derive(Debug, Clone)]
pub struct IngressMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Headers as a JSON object (`name -> string or null`).
    pub headers: serde_json::Value,
    /// The business id found where the topic's config says, if any.
    pub business_id: Option<String>,
}

impl IngressMessage {
    /// The inbox source: `kafka:<topic>`.
    pub fn source(&self) -> String {
        format!("kafka:{}", self.topic)
    }

    /// The inbox dedupe key: `id:<business id>`, else
    /// `offset:<topic>/<partition>/<offset>`.
    pub fn dedupe_key(&self) -> String {
        match &self.business_id {
            Some(id) => format!("id:{id}"),
            None => format!("offset:{}/{}/{}", self.topic, self.partition, self.offset),
        }
    }

    /// A key unique to this event across topics, for the effects' own
    /// unique keys (signal dedupe keys, workflow unique keys).
    pub fn event_key(&self) -> String {
        format!("{}:{}", self.source(), self.dedupe_key())
    }

    /// The payload parsed as JSON; a missing or malformed payload is poison.
    pub fn json(&self) -> Result<serde_json::Value, HandlerError> {
        let bytes = self
            .payload
            .as_deref()
            .ok_or_else(|| HandlerError::Poison("message has no payload".into()))?;
        serde_json::from_slice(bytes)
            .map_err(|e| HandlerError::Poison(format!("payload is not JSON: {e}")))
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.as_str())
    }
}

/// Why a handler did not apply a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// The message can never be applied (undecodable, invalid): dead-letter it now.
    #[error("poison message: {0}")]
    Poison(String),
    /// This attempt failed; retried with backoff, dead-lettered after `max-attempts`.
    #[error("handler failed: {0}")]
    Failed(String),
    /// Infrastructure trouble (database unreachable, deadlock): retried
    /// without limit, never dead-lettered.
    #[error("transient failure: {0}")]
    Transient(String),
}

impl From<ledgerflow_engine::Error> for HandlerError {
    fn from(e: ledgerflow_engine::Error) -> Self {
        if e.is_transient() {
            HandlerError::Transient(e.to_string())
        } else if matches!(
            e,
            ledgerflow_engine::Error::Invalid(_) | ledgerflow_engine::Error::Args { .. }
        ) {
            HandlerError::Poison(e.to_string())
        } else {
            HandlerError::Failed(e.to_string())
        }
    }
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        ledgerflow_engine::Error::from(e).into()
    }
}

/// Why a batch was not applied: the error, and which message of the batch
/// it is about when the handler knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    /// Index into the batch of the message that failed, if known.
    pub index: Option<usize>,
    /// What went wrong.
    pub error: HandlerError,
}

impl BatchError {
    /// An error about the batch as a whole.
    pub fn whole(error: impl Into<HandlerError>) -> Self {
        Self {
            index: None,
            error: error.into(),
        }
    }

    /// An error about message `index` of the batch.
    pub fn at(index: usize, error: impl Into<HandlerError>) -> Self {
        Self {
            index: Some(index),
            error: error.into(),
        }
    }
}

/// Turns messages into their effects on the caller's connection, which is
/// inside the transaction that also records the messages in the inbox. It
/// must write only through that connection (and never commit it).
#[async_trait]
pub trait MessageHandler: Send + Sync + 'static {
    /// Applies `msg`.
    async fn handle(
        &self,
        conn: &mut PgConnection,
        store: &Store,
        msg: &IngressMessage,
    ) -> Result<(), HandlerError>;

    /// Applies several messages of one partition, in offset order, in one
    /// transaction. The default calls [`MessageHandler::handle`] for each;
    /// override it to write them with fewer statements. On an error the
    /// whole transaction is rolled back and the ingress re-applies the
    /// messages one by one, counting the error against `index`'s message.
    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        store: &Store,
        msgs: &[&IngressMessage],
    ) -> Result<(), BatchError> {
        for (i, msg) in msgs.iter().enumerate() {
            self.handle(&mut *conn, store, msg)
                .instrument(super::trace::message_span(msg))
                .await
                .map_err(|e| BatchError::at(i, e))?;
        }
        Ok(())
    }
}

/// Enqueues a job whose args are the message's JSON payload.
#[derive(Debug, Clone)]
pub struct EnqueueJob {
    pub queue: String,
    pub kind: String,
}

#[async_trait]
impl MessageHandler for EnqueueJob {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        store: &Store,
        msg: &IngressMessage,
    ) -> Result<(), HandlerError> {
        store.job_insert_in(conn, &self.job(msg)?).await?;
        Ok(())
    }

    async fn handle_batch(
        &self,
        conn: &mut PgConnection,
        store: &Store,
        msgs: &[&IngressMessage],
    ) -> Result<(), BatchError> {
        let jobs = msgs
            .iter()
            .enumerate()
            .map(|(i, m)| {
                // Built in the message's span: the job continues the producer's trace.
                let _span = super::trace::message_span(m).entered();
                self.job(m).map_err(|e| BatchError::at(i, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        store
            .job_insert_many_in(conn, &jobs)
            .await
            .map_err(BatchError::whole)?;
        Ok(())
    }
}

impl EnqueueJob {
    fn job(&self, msg: &IngressMessage) -> Result<NewJob, HandlerError> {
        Ok(NewJob::new(self.kind.clone(), msg.json()?).queue(self.queue.clone()))
    }
}

/// Sends a workflow signal named `name`; the correlation key is the payload's
/// top-level field `correlation_field` (a string or a number).
#[derive(Debug, Clone)]
pub struct SendSignal {
    pub name: String,
    pub correlation_field: String,
}

#[async_trait]
impl MessageHandler for SendSignal {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        store: &Store,
        msg: &IngressMessage,
    ) -> Result<(), HandlerError> {
        let payload = msg.json()?;
        let key = json_text(payload.get(&self.correlation_field)).ok_or_else(|| {
            HandlerError::Poison(format!("payload has no field {:?}", self.correlation_field))
        })?;
        signal_send_in(conn, store, &self.name, &key, &payload, &msg.event_key()).await?;
        Ok(())
    }
}

/// Starts a workflow of `kind` with the JSON payload as input, unique per event.
#[derive(Debug, Clone)]
pub struct StartWorkflow {
    pub registry: Arc<WorkflowRegistry>,
    pub kind: String,
}

#[async_trait]
impl MessageHandler for StartWorkflow {
    async fn handle(
        &self,
        conn: &mut PgConnection,
        store: &Store,
        msg: &IngressMessage,
    ) -> Result<(), HandlerError> {
        let input = msg.json()?;
        workflow_start_in(
            conn,
            store,
            &self.registry,
            &self.kind,
            &input,
            Some(&msg.event_key()),
        )
        .await?;
        Ok(())
    }
}

/// Handlers by the name topics refer to in [`TopicConfig::handler`].
#[derive(Clone, Default)]
pub struct HandlerRegistry {
    handlers: HashMap<String, Arc<dyn MessageHandler>>,
}

impl std::fmt::Debug for HandlerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.handlers.keys()).finish()
    }
}

impl HandlerRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` under `name`.
    pub fn register(mut self, name: impl Into<String>, handler: impl MessageHandler) -> Self {
        self.handlers.insert(name.into(), Arc::new(handler));
        self
    }

    pub(super) fn get(&self, name: &str) -> Option<Arc<dyn MessageHandler>> {
        self.handlers.get(name).cloned()
    }
}

pub(super) fn json_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
