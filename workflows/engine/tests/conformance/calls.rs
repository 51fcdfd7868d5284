//! External calls over every configuration: writes and a call in one step, in-doubt calls
//! settled by the reconcile hook or an admin.
use super::*;

/// `call`: `a` writes an effect and makes its external call in one step, whose answer is
/// given by `answer`; its reconcile hook says `verdict` (asked once).
pub(crate) fn call(answer: Result<Value, CallError>, verdict: Reconciled) -> Workflow {
    Workflow::new("call", 1)
        .reconcile_attempts(1)
        .step("a", move |ctx: StepCtx| {
            let answer = answer.clone();
            async move {
                effect(&ctx, "a").await?;
                let got = ctx.external_call(|_key| async move { answer }).await?;
                Ok(StepOutcome::Continue(got))
            }
        })
        .reconcile(move |_ctx: StepCtx, key: String| {
            let verdict = verdict.clone();
            async move {
                Ok(match verdict {
                    Reconciled::Succeeded(v) => {
                        Reconciled::Succeeded(json!({ "v": v, "key": key }))
                    }
                    other => other,
                })
            }
        })
        .step("b", |ctx: StepCtx| async move {
            Ok(StepOutcome::Continue(json!({ "after": ctx.output("a") })))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
pub(crate) async fn a_step_writes_and_calls_out_in_one_step() -> TestResult {
    conforms(
        || registry(call(Ok(json!({ "order": 7 })), Reconciled::Unknown)),
        |rig| async move {
            let id = rig.start("call").await?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "completed");
            assert_eq!(rig.effects().await?, ["a"]);
            rig.dump().await
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
pub(crate) async fn an_in_doubt_call_is_settled_by_its_reconcile_hook() -> TestResult {
    let timeout = Err(CallError::Unknown("timed out".into()));
    conforms(
        || registry(call(timeout.clone(), Reconciled::Succeeded(json!("found")))),
        |rig| async move {
            let id = rig.start("call").await?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "completed");
            assert!(
                rig.effects().await?.is_empty(),
                "the doubtful step's writes are dropped"
            );
            rig.dump().await
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
pub(crate) async fn an_in_doubt_call_is_settled_by_an_admin() -> TestResult {
    let timeout = Err(CallError::Unknown("timed out".into()));
    conforms(
        || registry(call(timeout.clone(), Reconciled::Unknown)),
        |rig| async move {
            let id = rig.start("call").await?;
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "waiting");
            let mut tx = rig.db.pool.begin().await?;
            let settled = workflow_resolve_in(
                &mut tx,
                &rig.store,
                rig.runtime.registry(),
                id,
                "a",
                Resolution::Succeeded(json!({ "order": "by hand" })),
            )
            .await?;
            tx.commit().await?;
            assert!(settled);
            rig.drain().await?;
            assert_eq!(rig.state(id).await?, "completed");
            rig.dump().await
        },
    )
    .await
}
