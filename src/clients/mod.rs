//! Clients (contract §11): the API keys a request may carry, named (`API_KEYS_FILE`) or not
//! (`API_KEYS`), each with its rate limit and daily budgets; the set reloaded on `SIGHUP`.
//!
//! - this file: [`KeySet`] (finding a presented key in constant time) and [`Keys`] (the set
//!   in force, swapped whole on a reload, so a request sees the old set or the new one).
//! - [`usage`]: each named key's runs, tokens and cost today, and the budget check at the
//!   start of a run (in memory on SQLite, one shared table on PostgreSQL).
//!
//! A key is held only as a [`Secret`] and a digest; what rows, logs and metrics carry is its
//! name. A run still belongs to the key that started it (`resume::Owner` is derived from the
//! key, as before names existed), so renaming a key in the file keeps its runs resumable.

pub mod usage;

use std::{
    num::NonZeroU32,
    sync::{Arc, PoisonError, RwLock},
};

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::{
    config::{Config, KeyFile, KeyFileError},
    domain::Secret,
};

/// A sustained rate and a burst: a rate limit in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_minute: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Rate {
    /// `RATE_LIMIT_PER_MINUTE` and `RATE_LIMIT_BURST`; `None` when the limit is off.
    pub fn global(config: &Config) -> Option<Rate> {
        Some(Rate {
            per_minute: NonZeroU32::new(config.rate_limit_per_minute?)?,
            burst: NonZeroU32::new(config.rate_limit_burst)?,
        })
    }
}

/// A key's daily budgets, per UTC day; `None` is no budget.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Budgets {
    pub daily_token_budget: Option<u64>,
    pub daily_cost_budget_usd: Option<f64>,
}

/// One API key and what goes with it.
pub struct Client {
    /// `None` for a key of `API_KEYS`.
    name: Option<Arc<str>>,
    key: Secret,
    digest: [u8; 32],
    /// The limit in force for this key: its own, or the global one; `None` for no limit.
    pub rate: Option<Rate>,
    pub budgets: Budgets,
    /// Its rate-limit bucket: `client:NAME` for a named key (so a key can be replaced under
    /// the same name and keep its budget), the key's fingerprint for an unnamed one.
    bucket: Arc<str>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .field("rate", &self.rate)
            .field("budgets", &self.budgets)
            .finish_non_exhaustive()
    }
}

impl Client {
    fn new(name: Option<&str>, key: Secret, rate: Option<Rate>, budgets: Budgets) -> Client {
        let bucket = match name {
            Some(name) => format!("client:{name}"),
            None => key_bucket(&key),
        };
        Client {
            name: name.map(Arc::from),
            digest: digest(key.expose()),
            key,
            rate,
            budgets,
            bucket: bucket.into(),
        }
    }

    /// The key's name in the file; `None` for a key of `API_KEYS`.
    pub fn name(&self) -> Option<&Arc<str>> {
        self.name.as_ref()
    }

    /// The key itself: only to derive a run's owner (`resume::Owner`), never to print.
    pub fn key(&self) -> &Secret {
        &self.key
    }

    /// The rate-limit bucket of this key.
    pub fn bucket(&self) -> &Arc<str> {
        &self.bucket
    }
}

/// The shared rate-limit bucket of an unnamed key: `key:` and 128 bits of SHA-256 over a
/// fixed prefix and the key. Enough that keys never collide; nothing to recover the key from
/// (keys are long random strings). The runbook shows the same computation in shell.
pub fn key_bucket(key: &Secret) -> String {
    let digest = Sha256::new()
        .chain_update(b"duet rate limit\0")
        .chain_update(key.expose().as_bytes())
        .finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("key:{hex}")
}

/// What a presented key is compared by: SHA-256 of it, so that every comparison is of 32
/// bytes whatever the keys' lengths (a byte comparison of unequal lengths ends at once and
/// would tell a guesser the length of the keys).
fn digest(key: &str) -> [u8; 32] {
    Sha256::new()
        .chain_update(b"duet api key\0")
        .chain_update(key.as_bytes())
        .finalize()
        .into()
}

/// Every API key the service takes, at one moment.
#[derive(Debug, Default)]
pub struct KeySet {
    clients: Vec<Arc<Client>>,
}

impl KeySet {
    /// The keys of `API_KEYS` (unnamed, the global limit, no budget) and of the key file.
    /// A key of the file without its own `rate_limit_per_minute` gets the global limit, with
    /// its own `burst` if it has one; `0` turns the limit off for that key.
    ///
    /// `default_burst` is `RATE_LIMIT_BURST`, for a key with its own rate but no burst.
    pub fn new(
        api_keys: &[Secret],
        file: Option<&KeyFile>,
        global: Option<Rate>,
        default_burst: NonZeroU32,
    ) -> KeySet {
        let mut clients: Vec<Arc<Client>> = api_keys
            .iter()
            .map(|k| Arc::new(Client::new(None, k.clone(), global, Budgets::default())))
            .collect();
        for k in file.map(|f| f.keys.as_slice()).unwrap_or_default() {
            let per_minute = match k.rate_limit_per_minute {
                Some(n) => NonZeroU32::new(n),
                None => global.map(|g| g.per_minute),
            };
            let rate = per_minute.map(|per_minute| Rate {
                per_minute,
                burst: k.burst.unwrap_or(default_burst),
            });
            let budgets = Budgets {
                daily_token_budget: k.daily_token_budget,
                daily_cost_budget_usd: k.daily_cost_budget_usd,
            };
            clients.push(Arc::new(Client::new(
                Some(&k.name),
                k.key.clone(),
                rate,
                budgets,
            )));
        }
        KeySet { clients }
    }

    /// The keys of `API_KEYS` and of `file`, with the limits `config` sets.
    pub fn from_config(config: &Config, file: Option<&KeyFile>) -> KeySet {
        let default_burst = NonZeroU32::new(config.rate_limit_burst).unwrap_or(NonZeroU32::MIN);
        KeySet::new(&config.api_keys, file, Rate::global(config), default_burst)
    }

    /// The names of the file's keys, in its order.
    pub fn names(&self) -> Vec<Arc<str>> {
        self.named().filter_map(|c| c.name.clone()).collect()
    }

    /// True when no key is configured: the service is open.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// The keys of the file, in its order.
    pub fn named(&self) -> impl Iterator<Item = &Arc<Client>> {
        self.clients.iter().filter(|c| c.name.is_some())
    }

    /// The client whose key is `presented`. Its digest is compared with every key's, in
    /// constant time and with no early exit (the loop always runs to the end, and which key
    /// matched is carried by a constant-time select, not a branch), so the time an answer
    /// takes says nothing about which key a guess was near, or whether it matched.
    pub fn authenticate(&self, presented: &str) -> Option<Arc<Client>> {
        let wanted = digest(presented);
        let found = find(self.clients.iter().map(|c| &c.digest), &wanted);
        found.and_then(|i| self.clients.get(i).cloned())
    }
}

/// The position of `wanted` among `digests`, looking at every one of them.
fn find<'a>(digests: impl Iterator<Item = &'a [u8; 32]>, wanted: &[u8; 32]) -> Option<usize> {
    // Position + 1 of the match; 0 for none.
    let mut found = 0u64;
    for (i, d) in digests.enumerate() {
        let position = u64::try_from(i).unwrap_or(u64::MAX).saturating_add(1);
        found = u64::conditional_select(&found, &position, d.ct_eq(wanted));
    }
    usize::try_from(found).ok()?.checked_sub(1)
}

/// The key set in force. A reload builds a new set and swaps it in whole: a request holds
/// the set it started with (an `Arc`), so nothing changes under it, and open streams,
/// which hold their client, go on.
pub struct Keys {
    current: RwLock<Arc<KeySet>>,
}

impl Keys {
    pub fn new(set: KeySet) -> Keys {
        Keys {
            current: RwLock::new(Arc::new(set)),
        }
    }

    /// The keys of `config` as read at start.
    pub fn from_config(config: &Config) -> Keys {
        Keys::new(KeySet::from_config(config, config.key_file.as_ref()))
    }

    pub fn current(&self) -> Arc<KeySet> {
        // The lock only guards the swap of a pointer: what a panicking holder left is whole.
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn replace(&self, set: KeySet) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
    }

    /// Reads `API_KEYS_FILE` again and puts its keys in force, or keeps the keys in force
    /// when the file cannot be used (the error says why, naming the line, never a key).
    /// Returns the names now in force; `Ok(None)` without `API_KEYS_FILE` (nothing to
    /// reload).
    pub async fn reload(&self, config: &Config) -> Result<Option<Vec<Arc<str>>>, KeyFileError> {
        let Some(path) = &config.api_keys_file else {
            return Ok(None);
        };
        let reading = tokio::task::spawn_blocking({
            let path = path.clone();
            move || crate::config::keys::read(&path)
        });
        let text = reading.await.map_err(|e| KeyFileError {
            path: path.clone(),
            line: None,
            problem: format!("cannot read it: {e}"),
        })??;
        let file = KeyFile::parse(path, &text, &config.key_file_context())?;
        let set = KeySet::from_config(config, Some(&file));
        let names = set.names();
        self.replace(set);
        Ok(Some(names))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NamedKey;

    fn named(name: &str, key: &str) -> NamedKey {
        NamedKey {
            name: name.into(),
            key: Secret::new(key),
            rate_limit_per_minute: None,
            burst: None,
            daily_token_budget: None,
            daily_cost_budget_usd: None,
        }
    }

    #[test]
    fn keys_are_found_by_name_or_not() {
        let file = KeyFile {
            keys: vec![named("web", "sk-web"), named("batch", "sk-batch-longer")],
        };
        let set = KeySet::new(&[Secret::new("sk-env")], Some(&file), None, NonZeroU32::MIN);
        assert_eq!(set.authenticate("sk-env").unwrap().name(), None);
        assert_eq!(
            set.authenticate("sk-web").unwrap().name().map(|n| &**n),
            Some("web")
        );
        assert_eq!(
            set.authenticate("sk-batch-longer")
                .unwrap()
                .name()
                .map(|n| &**n),
            Some("batch")
        );
        assert!(set.authenticate("sk-we").is_none());
        assert!(set.authenticate("").is_none());
        assert!(KeySet::default().authenticate("sk-web").is_none());
        assert_eq!(set.named().count(), 2);
    }

    /// The structure that keeps the comparison constant-time: every key's digest is looked
    /// at whichever matches, the first, the last or none.
    #[test]
    fn every_key_is_compared_whichever_matches() {
        let digests: Vec<[u8; 32]> = (0..5).map(|i| digest(&format!("k{i}"))).collect();
        for (wanted, expect) in [("k0", Some(0)), ("k4", Some(4)), ("nope", None)] {
            let mut looked = 0;
            let found = find(digests.iter().inspect(|_| looked += 1), &digest(wanted));
            assert_eq!(found, expect);
            assert_eq!(looked, 5, "{wanted}: every key is compared");
        }
    }

    #[test]
    fn a_keys_limit_is_its_own_or_the_global_one() {
        let global = Rate {
            per_minute: NonZeroU32::new(60).unwrap(),
            burst: NonZeroU32::new(10).unwrap(),
        };
        let own = NamedKey {
            rate_limit_per_minute: Some(600),
            burst: NonZeroU32::new(50),
            ..named("own", "k1")
        };
        let off = NamedKey {
            rate_limit_per_minute: Some(0),
            ..named("off", "k2")
        };
        let burst_only = NamedKey {
            burst: NonZeroU32::new(3),
            ..named("burst", "k3")
        };
        let file = KeyFile {
            keys: vec![own, off, burst_only, named("plain", "k4")],
        };
        let set = KeySet::new(&[], Some(&file), Some(global), global.burst);
        let rate = |k: &str| set.authenticate(k).unwrap().rate;
        assert_eq!(
            rate("k1").map(|r| (r.per_minute.get(), r.burst.get())),
            Some((600, 50))
        );
        assert_eq!(rate("k2"), None);
        assert_eq!(
            rate("k3").map(|r| (r.per_minute.get(), r.burst.get())),
            Some((60, 3))
        );
        assert_eq!(rate("k4"), Some(global));
        // Without a global limit only a key's own applies.
        let set = KeySet::new(&[], Some(&file), None, NonZeroU32::MIN);
        assert_eq!(set.authenticate("k4").unwrap().rate, None);
        assert_eq!(
            set.authenticate("k1")
                .unwrap()
                .rate
                .map(|r| r.per_minute.get()),
            Some(600)
        );
    }

    /// The runbook's `printf 'duet rate limit\0%s' "$KEY" | sha256sum | cut -c1-32`.
    #[test]
    fn a_keys_bucket_is_its_fingerprint_as_the_runbook_computes_it() {
        assert_eq!(
            key_bucket(&Secret::new("sk-test-alpha")),
            "key:d60ef6044804c9bcf9c2ba1e837e5426"
        );
    }

    #[test]
    fn a_client_never_prints_its_key() {
        let c = Client::new(Some("web"), Secret::new("sk-web"), None, Budgets::default());
        assert!(!format!("{c:?}").contains("sk-web"));
    }
}
