//! Rebuilds the crate when a migration changes. `sqlx::migrate!` embeds the files under
//! `migrations/` at compile time, and cargo alone does not know they are inputs: a new
//! migration file would otherwise leave a build that neither runs it nor knows it exists.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
