//! Typed ids for the domain's rows, so an account id can't be passed where a user id is expected.
use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
            sqlx::Type,
        )]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh, time-ordered (v7) id: new rows cluster at the end of
            /// the primary-key index instead of scattering over it.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Self {
                id.0
            }
        }
    };
}

id_type!(
    /// A user (`users.id`).
    UserId
);
id_type!(
    /// An account (`accounts.id`).
    AccountId
);
id_type!(
    /// A ledger transfer (`ledger_transfers.id`).
    TransferId
);
id_type!(
    /// A hold (`holds.id`).
    HoldId
);
id_type!(
    /// An API key (`api_keys.id`).
    ApiKeyId
);
id_type!(
    /// An admin (`admins.id`).
    AdminId
);
