//! Integration tests: the real server on loopback, real HTTP, scripted providers.
//!
//! Timing tests run on tokio's paused clock (`start_paused = true`): the server, its runs and
//! the client share one current-thread runtime, so the clock only jumps when every task is
//! waiting, and deadlines fire at exact, repeatable instants.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test scaffolding: a failed step should fail the test, loudly"
)]
#![expect(
    clippy::disallowed_methods,
    reason = "a test's servers and clients are plain tasks: each test's runtime ends them"
)]

mod agreement;
mod audit;
mod audit_cli;
mod audit_faults;
mod audit_http;
mod bench;
mod clients;
mod connections;
mod console;
mod conversation;
mod cost;
mod db;
mod deploy;
mod egress_proxy;
mod failover;
mod helpers;
mod hostile_bodies;
mod metrics;
mod openai_compat;
mod openapi;
mod process;
mod protection;
mod proxy;
mod real_providers;
mod resume;
mod retention;
mod running;
mod runs_list;
mod startup;
mod stream;
mod traces;
mod upstream;
mod upstream_h1;
mod validation;
