//! Ledgerflow's HTTP surface (public API, webhooks, admin); filled by the API issue.
