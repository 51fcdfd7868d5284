//! Helpers shared by the engine's integration tests.
pub use ledgerflow_engine::testing::TestDb;
