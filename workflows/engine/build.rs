//! Rebuilds the engine when a migration is added or changed, so the embedded
//! `MIGRATOR` (`sqlx::migrate!`) never lags behind the `migrations/` folder.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
