//! The vocabulary every part of duet shares and that is not configuration: the two roles of a
//! run and secrets that cannot be printed by accident. A leaf: it imports nothing of duet.

use std::fmt;

use serde::Serialize;

/// The two models of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Flash,
    Pro,
}

impl Role {
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Flash => "flash",
            Role::Pro => "pro",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A secret that cannot be printed by accident: `Debug` shows `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The only way to read the value; grep for it when auditing where secrets go.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}
