//! The admin console end to end: headless Chromium (driven by
//! `e2e/console.spec.mjs` through playwright-core) against the real admin
//! listener on a socket, a real job runner and a real Postgres.
//!
//! The browser signs in (a wrong credential first), finds the dead jobs with
//! the filters, retries one with a reason and watches the runner complete it
//! (and, signed in as a viewer, sees their name and role, the operator
//! buttons disabled, and a retry forced through anyway refused with 403),
//! sees who is signed in as the operator, then does the
//! same for a failed workflow, whose step journal it shows;
//! this test then checks the final database state — the job completed on its
//! second attempt, the workflow completed, one `job.retry` and one
//! `workflow.retry` audit row with that reason, the other dead job untouched.
//!
//! It lives in `workers` (not `api`) because it needs the runner, and `api`
//! must not depend on `workers`. Node, Chromium and playwright-core are
//! prerequisites: when one is missing the test fails and says how to install
//! it (`cargo xtask e2e --setup`), rather than passing without a browser.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use ledgerflow_api::AppState;
use ledgerflow_engine::testing::TestDb;
use ledgerflow_engine::{
    JobState, NewJob, Outcome, StepCtx, StepOutcome, Store, Workflow, WorkflowRegistry,
    WorkflowRuntime,
};
use ledgerflow_payments::users::{self, AdminRole};
use ledgerflow_workers::runner::{JobContext, QueueConfig, Registry, Runner, RunnerConfig};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const QUEUE: &str = "console-e2e";
/// The workflow's own queue, so its failed step job is not among the jobs
/// the browser counts in `QUEUE`.
const WORKFLOW_QUEUE: &str = "console-e2e-workflows";
const KIND: &str = "console.flaky";
const REASON: &str = "e2e: exchange is back, run it again";
/// The whole browser run; the script stops itself a little earlier.
const BROWSER_BUDGET: Duration = Duration::from_secs(120);

fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e")
}

/// What is missing to run the browser, as install instructions.
fn missing_prerequisites(node: &str, chromium: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    let version = std::process::Command::new(node).arg("--version").output();
    match version {
        Ok(out) if out.status.success() => {
            let v = String::from_utf8_lossy(&out.stdout);
            let major: u32 = v
                .trim()
                .trim_start_matches('v')
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            if major < 20 {
                missing.push(format!(
                    "Node.js >= 20 (found {}): apt-get install -y nodejs npm, or see nodejs.org",
                    v.trim()
                ));
            }
        }
        _ => missing.push(format!(
            "Node.js (`{node}` did not run): apt-get install -y nodejs npm (or set LEDGERFLOW_NODE)"
        )),
    }
    if !chromium.exists() {
        missing.push(format!(
            "Chromium at {}: apt-get install -y chromium chromium-driver (or set CHROMIUM)",
            chromium.display()
        ));
    }
    if !e2e_dir()
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        missing.push("playwright-core in e2e/node_modules: (cd e2e && npm ci)".into());
    }
    missing
}

/// Fails its first attempt with the error text from its args, if it has one
/// (with one attempt allowed, the job is then discarded: a dead letter);
/// succeeds on any later attempt, i.e. after an admin retried it.
async fn flaky(ctx: JobContext) -> Outcome {
    match ctx.job().args["error"].as_str() {
        Some(error) if ctx.lease().attempt == 1 => Outcome::retry(error),
        _ => Outcome::Complete,
    }
}

/// Whether the workflow's `charge` step still fails (only its first run does).
static CHARGE_FAILS: AtomicBool = AtomicBool::new(true);

/// `reserve` → `charge`; the first `charge` fails and, with one attempt per
/// step, fails the workflow — until an admin retries it.
fn checkout() -> Workflow {
    Workflow::new("console.checkout", 1)
        .queue(WORKFLOW_QUEUE)
        .max_attempts(1)
        .step("reserve", |_: StepCtx| async move {
            Ok(StepOutcome::Continue(json!({"reserved": true})))
        })
        .step("charge", |_: StepCtx| async move {
            if CHARGE_FAILS.swap(false, Ordering::SeqCst) {
                return Err("card network down (simulated)".to_string());
            }
            Ok(StepOutcome::Finish(json!({"charged": true})))
        })
}

async fn workflow_state(db: &TestDb, id: impl std::fmt::Display) -> String {
    sqlx::query_scalar("SELECT state FROM workflows WHERE id = $1::uuid")
        .bind(id.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn state_of(store: &Store, id: ledgerflow_engine::JobId) -> JobState {
    store.job_get(id).await.unwrap().unwrap().state
}

async fn wait_state(store: &Store, id: ledgerflow_engine::JobId, want: JobState) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = state_of(store, id).await;
        if state == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} stayed {state}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_signs_in_finds_a_dead_job_retries_it_and_sees_it_complete() {
    let node = std::env::var("LEDGERFLOW_NODE").unwrap_or_else(|_| "node".into());
    let chromium =
        PathBuf::from(std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()));
    let missing = missing_prerequisites(&node, &chromium);
    assert!(
        missing.is_empty(),
        "the console e2e test needs a browser toolchain; missing:\n  - {}\n\
         Install all of it with `cargo xtask e2e --setup` (apt-get chromium, npm ci in e2e/).",
        missing.join("\n  - ")
    );

    let db = TestDb::new().await.unwrap();
    let store = Store::new(db.pool.clone());
    let mut conn = db.pool.acquire().await.unwrap();
    let (_, operator) = users::create_admin(&mut conn, "olga", AdminRole::Operator)
        .await
        .unwrap();
    let (_, viewer) = users::create_admin(&mut conn, "vic", AdminRole::Viewer)
        .await
        .unwrap();
    drop(conn);

    // A real runner works both queues for the whole test.
    let runtime = WorkflowRuntime::new(
        store.clone(),
        WorkflowRegistry::new().register(checkout()).unwrap(),
    );
    let registry = Registry::new()
        .register(KIND, flaky)
        .workflows(runtime.handler());
    let runner = Runner::start(
        store.clone(),
        registry,
        RunnerConfig {
            worker_id: "console-e2e-worker".into(),
            queues: vec![
                QueueConfig::new(QUEUE, 4),
                QueueConfig::new(WORKFLOW_QUEUE, 4),
            ],
            poll_interval: Duration::from_millis(200),
            promote_interval: Duration::from_millis(100),
            ..RunnerConfig::default()
        },
    )
    .await
    .unwrap();

    // Two jobs die on their only attempt: the target, and one whose args and
    // error carry markup (the console must show it as text). A third
    // completes, so the state filter has something to leave out.
    let insert = |args: serde_json::Value, max_attempts: i32| {
        let store = store.clone();
        async move {
            store
                .job_insert(
                    &NewJob::new(KIND, args)
                        .queue(QUEUE)
                        .max_attempts(max_attempts),
                )
                .await
                .unwrap()
                .id()
        }
    };
    let target = insert(
        json!({"order": "e2e-target", "error": "exchange unavailable (simulated outage)"}),
        1,
    )
    .await;
    let hostile = insert(
        json!({
            "order": "<script>window.__lf_xss=1</script>",
            // Markup, and a right-to-left override that would make the
            // rest read `bc1qattack-local` if it were shown as it is.
            "error": "<img src=x onerror=window.__lf_xss=1> exchange unavailable bc1q\u{202e}lacol-kcatta"
        }),
        1,
    )
    .await;
    wait_state(&store, target, JobState::Discarded).await;
    wait_state(&store, hostile, JobState::Discarded).await;
    let done = insert(json!({"order": "e2e-done"}), 1).await;
    wait_state(&store, done, JobState::Completed).await;
    // And a workflow fails at its second step.
    let workflow = runtime
        .start("console.checkout", &json!({}), None)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while workflow_state(&db, workflow).await != "failed" {
        assert!(Instant::now() < deadline, "the workflow did not fail");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The admin listener on a real socket (the public one comes along).
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ledgerflow_api::serve_listeners(
        public,
        admin,
        AppState::new(store.clone())
            .unwrap()
            .with_workflows(runtime.registry().clone()),
        async {
            let _ = stopped.await;
        },
    ));

    let started = Instant::now();
    let run = tokio::process::Command::new(&node)
        .arg(e2e_dir().join("console.spec.mjs"))
        .arg(format!("http://{admin_addr}"))
        .arg(operator.expose_secret())
        .arg(QUEUE)
        .arg(REASON)
        .arg(viewer.expose_secret())
        .env("CHROMIUM", &chromium)
        .current_dir(e2e_dir())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(BROWSER_BUDGET, run)
        .await
        .expect("the browser run did not finish in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "browser run took {:.1}s\n--- stdout\n{stdout}--- stderr\n{stderr}",
        started.elapsed().as_secs_f64()
    );
    assert!(out.status.success(), "the browser run failed: {stderr}");
    assert!(
        stdout.contains(&format!("target={target}")),
        "the browser retried some other job: {stdout}"
    );
    assert!(
        stdout.contains(&format!("workflow={workflow}")),
        "the browser retried some other workflow: {stdout}"
    );

    // The final state, from the database.
    let job = store.job_get(target).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(job.attempt, 2, "completed by the retry, not before it");
    let audit: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT action, reason, admin_name FROM audit_log WHERE target_type = 'job' AND target_id = $1",
    )
    .bind(target.to_string())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        audit,
        vec![(
            "job.retry".to_string(),
            REASON.to_string(),
            "olga".to_string()
        )]
    );
    assert_eq!(workflow_state(&db, workflow).await, "completed");
    let workflow_audit: Vec<(String, String)> = sqlx::query_as(
        "SELECT action, reason FROM audit_log WHERE target_type = 'workflow' AND target_id = $1",
    )
    .bind(workflow.to_string())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        workflow_audit,
        vec![("workflow.retry".to_string(), REASON.to_string())]
    );
    let all_audit: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(all_audit, 2, "the browser changed something else too");
    assert_eq!(state_of(&store, hostile).await, JobState::Discarded);

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    runner.shutdown(Duration::from_secs(5)).await;
}
