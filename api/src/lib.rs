//! Ledgerflow's HTTP surface: the public API and the admin API, each on its
//! own listener, with health, readiness, metrics and OpenAPI/Swagger UI.
//!
//! The apps are built by functions ([`public_app`], [`admin_app`]) so tests
//! run them in-process with `poem::test::TestClient`, and the binary serves
//! both with [`serve`] (or [`serve_listeners`] on already-bound sockets,
//! which is how tests use port 0).
//!
//! Layout:
//! - [`public`]     — `/v1` for users (bearer API key): balances, trades,
//!   withdrawals;
//! - [`idempotency`] — the `Idempotency-Key` protocol of the public POSTs;
//! - [`batch`]      — group commit of the public POSTs (one transaction for
//!   many concurrent ones);
//! - [`admin`]      — the admin API (bearer admin credential, roles, audit;
//!   parameters parsed in [`admin_params`]):
//!   jobs, queues, audit log; [`admin_workflows`], [`admin_cron`], [`admin_flow`],
//!   [`admin_dead_letters`], [`admin_approvals`], [`admin_policy`] and
//!   [`admin_access`] add workflows, cron schedules, flow-control limits, dead letters,
//!   withdrawal approvals, the withdrawal policy, and `/v1/me` with admin
//!   and API-key management;
//! - [`console`]    — the admin web console (embedded static page over the admin API);
//! - [`auth`]       — credentials and the role/permission allow-list;
//! - [`throttle`]   — 429 after repeated failed authentication;
//! - [`ops`]        — `/healthcheck`, `/readyz` (a list of checks), `/metrics`
//!   (admin listener only);
//! - [`middleware`] — request ids, body limit, URI and JSON checks, timeout,
//!   problem+json for every error, metrics;
//! - [`input`]      — edge validation of text (control, bidi and invisible
//!   characters, lengths, duplicate JSON keys);
//! - [`metrics`]    — the Prometheus registry and its catalogue;
//! - [`error`]      — the crate's one error type and RFC 7807 problems;
//! - [`types`]      — strict wire types for request bodies;
//! - [`spec`]       — the OpenAPI documents as committed and served.
//!
//! Architecture Invariant: no SQL here. Job queries live in
//! `ledgerflow_engine::admin_query`, audit rows in `ledgerflow_payments::audit`.

pub mod admin;
pub mod admin_access;
pub mod admin_approvals;
pub mod admin_cron;
pub mod admin_dead_letters;
pub mod admin_flow;
pub mod admin_params;
pub mod admin_policy;
pub mod admin_workflows;
pub mod auth;
pub mod batch;
pub mod console;
pub mod error;
mod flow_metrics;
pub mod idempotency;
pub mod input;
pub mod json_body;
pub mod metrics;
pub mod middleware;
pub mod ops;
pub mod public;
pub mod spec;
pub mod throttle;
pub mod types;
pub mod wakeup;
pub mod webhooks;

pub use error::{Error, Problem, Result};
pub use ops::ReadinessCheck;

use crate::metrics::Metrics;
use crate::middleware::{Limits, Routes};
use ledgerflow_engine::Store;
use poem::http::Method;
use poem::listener::TcpAcceptor;
use poem::{Endpoint, EndpointExt, Route, Server, get, post};
use poem_openapi::OpenApiService;
use sqlx::PgPool;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The API version shown in the specs.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Settings of both listeners.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest request body in bytes (default 64 KiB).
    pub body_limit: usize,
    /// Longest time to answer one request (default 30 s).
    pub request_timeout: Duration,
    /// How long [`serve`] waits for in-flight requests on shutdown (default 10 s).
    pub shutdown_grace: Duration,
    /// Webhook providers (see [`webhooks`]; default: none).
    pub webhooks: webhooks::WebhookProviders,
    /// How long a user API key that authenticated is trusted without being
    /// looked up again (default 1 s; zero: looked up on every request). A
    /// revoked key stops working within this time; see [`auth::KeyCache`].
    pub api_key_cache_ttl: Duration,
    /// Most public POSTs committed in one shared transaction (default 8;
    /// 1: every POST in a transaction of its own). See [`batch`]. With 32
    /// clients, 8 gave a lower p99 than 16 at the same rate (docs/benchmarks.md).
    pub post_batch: usize,
    /// Most transactions of public POSTs running at once (default 4).
    pub post_transactions: usize,
    /// The configured withdrawal policy (what the admin API shows for an
    /// asset without an admin's override; the workers apply the same).
    pub withdrawal_policy: ledgerflow_payments::policy::Policy,
    /// When failed authentication is answered 429 (see [`throttle`]).
    pub auth_throttle: throttle::Limits,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            body_limit: 64 * 1024,
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            webhooks: webhooks::WebhookProviders::default(),
            api_key_cache_ttl: Duration::from_secs(1),
            post_batch: 8,
            post_transactions: 4,
            withdrawal_policy: ledgerflow_payments::policy::Policy::new(),
            auth_throttle: throttle::Limits::default(),
        }
    }
}

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The Postgres pool (the store's, by default).
    pub pool: PgPool,
    /// The job store.
    pub store: Store,
    /// Settings.
    pub config: Arc<ApiConfig>,
    /// Metrics (exported by the admin listener's `/metrics` and, in the
    /// binary, the ops port's; never by the public listener).
    pub metrics: Arc<Metrics>,
    /// The webhook intake (providers, workflow registry, rejection counter).
    pub webhooks: Arc<webhooks::Intake>,
    /// The workflows the public API starts (trades, withdrawals); set by
    /// [`AppState::with_workflows`]. Without it, those POSTs answer 503.
    pub workflows: Option<Arc<ledgerflow_engine::WorkflowRegistry>>,
    /// Job wake-ups the public POSTs send after their commits.
    pub wakeups: Arc<wakeup::Wakeups>,
    /// Registered assets the public POSTs have looked up.
    pub assets: Arc<public::AssetCache>,
    /// User API keys that authenticated recently.
    pub keys: Arc<auth::KeyCache>,
    /// The public POSTs' transaction runners.
    pub batcher: Arc<batch::Batcher>,
    /// Failed authentication counters.
    pub throttle: Arc<throttle::AuthThrottle>,
    checks: Arc<Vec<Arc<dyn ReadinessCheck>>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("config", &self.config)
            .field(
                "checks",
                &self
                    .checks
                    .iter()
                    .map(|c| c.name().to_string())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// State on `store`'s pool with default settings and the Postgres readiness check.
    pub fn new(store: Store) -> Result<Self> {
        Self::with_config(store, ApiConfig::default())
    }

    /// State with explicit settings.
    pub fn with_config(store: Store, config: ApiConfig) -> Result<Self> {
        let metrics = Metrics::new().map_err(|e| Error::Internal(e.to_string()))?;
        let pool = store.pool().clone();
        let intake = webhooks::Intake::new(&metrics, config.webhooks.clone())
            .map_err(|e| Error::Internal(e.to_string()))?;
        let batcher = batch::Batcher::new(
            config.post_transactions,
            config.post_batch,
            metrics.registry(),
        )
        .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Self {
            webhooks: Arc::new(intake),
            workflows: None,
            wakeups: Arc::new(wakeup::Wakeups::new(pool.clone())),
            assets: Arc::new(public::AssetCache::default()),
            keys: Arc::new(auth::KeyCache::new(config.api_key_cache_ttl)),
            batcher: Arc::new(batcher),
            throttle: Arc::new(throttle::AuthThrottle::new(config.auth_throttle.clone())),
            checks: Arc::new(vec![Arc::new(ops::Postgres(pool.clone()))]),
            pool,
            store,
            config: Arc::new(config),
            metrics: Arc::new(metrics),
        })
    }

    /// Lets the webhook intake start the `payments.webhook` workflow
    /// (without it, valid deliveries are answered 503).
    pub fn with_workflows(mut self, registry: Arc<ledgerflow_engine::WorkflowRegistry>) -> Self {
        self.webhooks = Arc::new(self.webhooks.with_workflows(registry.clone()));
        self.workflows = Some(registry);
        self
    }

    /// Adds a readiness check (e.g. Kafka's) to `/readyz`.
    pub fn with_check(mut self, check: Arc<dyn ReadinessCheck>) -> Self {
        let mut checks = (*self.checks).clone();
        checks.push(check);
        self.checks = Arc::new(checks);
        self
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn limits(&self) -> Limits {
        Limits {
            body_bytes: self.config.body_limit,
            request_timeout: self.config.request_timeout,
            raw_bodies: &[],
        }
    }
}

fn public_service() -> OpenApiService<public::PublicApi, ()> {
    OpenApiService::new(public::PublicApi, "Ledgerflow public API", VERSION)
        .description("Balances, trades and withdrawals. POSTs need an Idempotency-Key. Errors are RFC 7807 problems.")
}

/// Every admin operation group (one `#[OpenApi]` impl per file).
type AdminApis = (
    admin::AdminApi,
    admin_workflows::WorkflowsApi,
    admin_cron::CronApi,
    admin_flow::FlowApi,
    admin_dead_letters::DeadLettersApi,
    admin_approvals::ApprovalsApi,
    admin_policy::PolicyApi,
    admin_access::AccessApi,
);

fn admin_service() -> OpenApiService<AdminApis, ()> {
    OpenApiService::new(
        (
            admin::AdminApi,
            admin_workflows::WorkflowsApi,
            admin_cron::CronApi,
            admin_flow::FlowApi,
            admin_dead_letters::DeadLettersApi,
            admin_approvals::ApprovalsApi,
            admin_policy::PolicyApi,
            admin_access::AccessApi,
        ),
        "Ledgerflow admin API",
        VERSION,
    )
    .description(
        "Jobs, queues, workflows, cron schedules, dead letters, withdrawal approvals, the \
         withdrawal policy, admins and API keys, and the audit log. Every mutation requires a reason and is audited in the same \
         transaction. Errors are RFC 7807 problems.",
    )
}

/// The public API's OpenAPI document (JSON), as committed in `api/openapi/public.json`.
pub fn public_spec() -> String {
    spec::with_nullable_optionals(&public_service().spec())
}

/// The admin API's OpenAPI document (JSON), as committed in `api/openapi/admin.json`.
pub fn admin_spec() -> String {
    spec::with_nullable_optionals(&admin_service().spec())
}

/// `/openapi.json` of the public listener (built once).
#[poem::handler]
fn public_spec_json() -> poem::Response {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    spec::serve(DOC.get_or_init(public_spec))
}

/// `/openapi.json` of the admin listener (built once).
#[poem::handler]
fn admin_spec_json() -> poem::Response {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    spec::serve(DOC.get_or_init(admin_spec))
}

/// The public listener's app: `/v1/…`, `/healthcheck`, `/readyz`,
/// `/openapi.json`, `/docs`. No `/metrics`: queue names, states and volumes
/// are not for the internet (the chart's public Ingress routes `/` here);
/// they are scraped on the ops port (`ledgerflow_workers::ops`, fed by
/// [`AppState::metrics`]) and on the admin listener.
pub fn public_app(state: AppState) -> impl Endpoint<Output = poem::Response> {
    let service = public_service();
    let route = Route::new()
        .at("/healthcheck", get(ops::healthcheck))
        .at("/readyz", get(ops::readyz))
        .at("/v1/webhooks/:provider", post(webhooks::receive))
        .at("/openapi.json", get(public_spec_json))
        .nest("/docs", service.swagger_ui())
        .nest("/", service)
        .data(state.clone());
    let routes = Routes::new(&[public::ROUTES, webhooks::ROUTES].concat())
        .allow_spec(&public_spec())
        .allow("/v1/webhooks/{provider}", Method::POST);
    middleware::wrap(
        route,
        "public",
        plain_routes(routes),
        Limits {
            // The webhook handler checks the signature over the raw bytes
            // first, then judges the JSON itself.
            raw_bodies: &["/v1/webhooks/"],
            ..state.limits()
        },
        state.metrics.clone(),
    )
}

/// The admin listener's app: `/v1/…` (admin credentials), `/healthcheck`,
/// `/readyz`, `/metrics`, `/openapi.json`, `/docs`.
pub fn admin_app(state: AppState) -> impl Endpoint<Output = poem::Response> {
    let service = admin_service();
    // Probes and scrapes too, so the admin role can run as its own Deployment.
    let route = Route::new()
        .at("/healthcheck", get(ops::healthcheck))
        .at("/readyz", get(ops::readyz))
        .at("/metrics", get(ops::metrics))
        .at("/openapi.json", get(admin_spec_json))
        .nest("/docs", service.swagger_ui());
    // The web console (`/`, `/console/…`), a static client of this API.
    let route = console::routes(route)
        .nest("/", service)
        .data(state.clone());
    let routes = Routes::new(
        &[
            admin::ROUTES,
            admin_workflows::ROUTES,
            admin_cron::ROUTES,
            admin_flow::ROUTES,
            admin_dead_letters::ROUTES,
            admin_approvals::ROUTES,
            admin_policy::ROUTES,
            admin_access::ROUTES,
            console::ROUTES,
        ]
        .concat(),
    )
    .allow_spec(&admin_spec());
    let routes = console::ROUTES
        .iter()
        .fold(routes, |r, t| r.allow(t, Method::GET));
    middleware::wrap(
        console::with_root_redirect(route),
        "admin",
        plain_routes(routes),
        state.limits(),
        state.metrics.clone(),
    )
}

/// The methods of the routes both listeners serve outside the spec.
fn plain_routes(routes: Routes) -> Routes {
    [
        "/healthcheck",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/docs",
    ]
    .iter()
    .fold(routes, |r, t| r.allow(t, Method::GET))
}

/// Binds both addresses and serves the public and admin apps until
/// `shutdown` resolves, then drains in-flight requests for up to
/// `config.shutdown_grace`. Bind errors are returned before anything is served.
/// (One process, both listeners; see [`serve_public`] and [`serve_admin`]
/// to run them as separate roles.)
pub async fn serve(
    public_addr: SocketAddr,
    admin_addr: SocketAddr,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let public = tokio::net::TcpListener::bind(public_addr).await?;
    let admin = tokio::net::TcpListener::bind(admin_addr).await?;
    serve_listeners(public, admin, state, shutdown).await
}

/// Serves only the public app on `addr` until `shutdown` resolves.
pub async fn serve_public(
    addr: SocketAddr,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let grace = state.config.shutdown_grace;
    serve_app(listener, public_app(state), "public", shutdown, grace).await
}

/// Serves only the admin app on `addr` until `shutdown` resolves.
pub async fn serve_admin(
    addr: SocketAddr,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let grace = state.config.shutdown_grace;
    serve_app(listener, admin_app(state), "admin", shutdown, grace).await
}

async fn serve_app(
    listener: tokio::net::TcpListener,
    app: impl Endpoint + 'static,
    name: &'static str,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<()> {
    tracing::info!(listener = name, addr = ?listener.local_addr().ok(), "api listening");
    Server::new_with_acceptor(TcpAcceptor::from_tokio(listener)?)
        .run_with_graceful_shutdown(app, shutdown, Some(grace))
        .await?;
    tracing::info!(listener = name, "api stopped");
    Ok(())
}

/// Like [`serve`] on already-bound listeners (tests bind port 0 and read
/// the address back). If either server fails, the other is stopped too.
pub async fn serve_listeners(
    public: tokio::net::TcpListener,
    admin: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let token = CancellationToken::new();
    let trigger = token.clone();
    let watcher = tokio::spawn(async move {
        tokio::select! {
            () = shutdown => trigger.cancel(),
            () = trigger.cancelled() => {}
        }
    });
    let grace = state.config.shutdown_grace;
    let (a, b) = tokio::join!(
        async {
            let r = serve_app(
                public,
                public_app(state.clone()),
                "public",
                token.clone().cancelled_owned(),
                grace,
            )
            .await;
            token.cancel();
            r
        },
        async {
            let r = serve_app(
                admin,
                admin_app(state.clone()),
                "admin",
                token.clone().cancelled_owned(),
                grace,
            )
            .await;
            token.cancel();
            r
        }
    );
    watcher.abort();
    a?;
    b?;
    Ok(())
}
