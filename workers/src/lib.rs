//! Ledgerflow worker process (runner lands next).
