//! Development tools, reached only from the command line: the service (`server`, `api`,
//! `run`, `providers`, …) never imports anything from here.
//!
//! - [`mock`]: `duet mock-provider`, a local upstream speaking the three wire formats, with
//!   faults on request; also a library for the tests.
//! - [`bench`](mod@bench): `duet bench`, the load generator and the audit-writer benchmark.

pub mod bench;
pub mod mock;
