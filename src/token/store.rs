//! The token store: digest → metadata, read lock-free on every request, written only by sources.
//!
//! Each source (file, Unleash) hands over its *whole* current set; the store diffs it against what that
//! source gave last time and touches only the entries that changed, so a sync of an unchanged million
//! tokens costs no cache churn. Readers go straight to the moka cache and never see the writer's mutex.
//! The cache is unbounded on purpose: evicting a valid token would turn into a false 401.

use super::{Digest, TokenInfo, TokenKind, TokenSource};
use moka::sync::Cache;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

pub type TokenSet = HashMap<Digest, Arc<TokenInfo>>;

pub struct TokenStore {
    cache: Cache<Digest, Arc<TokenInfo>>,
    writer: Mutex<Writer>,
    /// One bit per [`TokenSource`] that has delivered a set.
    loaded: AtomicU8,
}

#[derive(Default)]
struct Writer {
    /// Keyed by source; `BTreeMap` order is priority order (File before Unleash).
    sets: BTreeMap<TokenSource, Arc<TokenSet>>,
    conflicts_logged: HashSet<Digest>,
    counts: BTreeMap<(TokenKind, TokenSource), usize>,
}

/// What one `replace_source` changed, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub total: usize,
}

impl Default for TokenStore {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenStore {
    pub fn new() -> TokenStore {
        TokenStore {
            cache: Cache::builder().name("tokens").build(),
            writer: Mutex::new(Writer::default()),
            loaded: AtomicU8::new(0),
        }
    }

    /// The hot-path read: one hash lookup and an `Arc` clone.
    pub fn lookup(&self, digest: &Digest) -> Option<Arc<TokenInfo>> {
        self.cache.get(digest)
    }

    /// True once any source delivered a set (possibly empty): from then on "unknown" means unknown.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire) != 0
    }

    /// True once `source` delivered a set: readiness waits for every configured source, so a token file
    /// does not make an instance "ready" while the Unleash list it also depends on is still missing.
    pub fn is_source_loaded(&self, source: TokenSource) -> bool {
        self.loaded.load(Ordering::Acquire) & (1 << source as u8) != 0
    }

    /// Effective token count per kind and source (shadowed entries are not counted).
    pub fn counts(&self) -> Vec<(TokenKind, TokenSource, usize)> {
        let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        w.counts.iter().map(|(&(k, s), &n)| (k, s, n)).collect()
    }

    /// Replaces everything `source` contributes with `set`.
    pub fn replace_source(&self, source: TokenSource, set: TokenSet) -> ApplyStats {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let new = Arc::new(set);
        let old = w.sets.insert(source, new.clone()).unwrap_or_default();
        let mut stats = ApplyStats {
            total: new.len(),
            ..ApplyStats::default()
        };
        for (digest, info) in new.iter() {
            match old.get(digest) {
                Some(prev) if prev == info => continue,
                Some(_) => stats.updated += 1,
                None => stats.added += 1,
            }
            self.refresh(&mut w, digest);
        }
        for digest in old.keys().filter(|d| !new.contains_key(*d)) {
            stats.removed += 1;
            self.refresh(&mut w, digest);
        }
        w.counts = count_effective(&w.sets);
        // Do the cache's bookkeeping for this batch here, on the writer, instead of leaving it to be
        // amortised over the next requests' lookups.
        self.cache.run_pending_tasks();
        self.loaded.fetch_or(1 << source as u8, Ordering::AcqRel);
        stats
    }

    /// Puts the winning entry for `digest` (first source in priority order) into the cache.
    fn refresh(&self, w: &mut Writer, digest: &Digest) {
        let mut holders = w.sets.values().filter_map(|s| s.get(digest));
        match holders.next() {
            Some(winner) => {
                if holders.next().is_some() && w.conflicts_logged.insert(*digest) {
                    tracing::warn!(
                        token = %winner.fingerprint,
                        source = winner.source.as_str(),
                        "token is defined by more than one source; the token file entry wins"
                    );
                }
                self.cache.insert(*digest, winner.clone());
            }
            None => self.cache.invalidate(digest),
        }
    }
}

fn count_effective(sets: &BTreeMap<TokenSource, Arc<TokenSet>>) -> BTreeMap<(TokenKind, TokenSource), usize> {
    let mut counts = BTreeMap::new();
    let mut seen: Vec<&TokenSet> = Vec::new();
    for (&source, set) in sets {
        for (digest, info) in set.iter() {
            if seen.iter().any(|s| s.contains_key(digest)) {
                continue;
            }
            *counts.entry((info.kind, source)).or_insert(0) += 1;
        }
        seen.push(set);
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(kind: TokenKind, source: TokenSource, tok: &str) -> (Digest, Arc<TokenInfo>) {
        let d = Digest::of(tok);
        let i = TokenInfo {
            kind,
            projects: Arc::from(vec!["*".to_string()]),
            environment: Some("development".into()),
            name: None,
            expires_at: None,
            fingerprint: d.fingerprint(),
            source,
        };
        (d, Arc::new(i))
    }

    #[test]
    fn replace_adds_updates_and_removes() {
        let store = TokenStore::new();
        assert!(!store.is_loaded());
        let (a, ia) = info(TokenKind::Client, TokenSource::File, "a");
        let (b, ib) = info(TokenKind::Frontend, TokenSource::File, "b");
        let s = store.replace_source(TokenSource::File, TokenSet::from([(a, ia), (b, ib.clone())]));
        assert_eq!((s.added, s.updated, s.removed), (2, 0, 0));
        assert!(store.is_loaded());
        assert_eq!(store.lookup(&a).unwrap().kind, TokenKind::Client);

        let (_, ia2) = info(TokenKind::Admin, TokenSource::File, "a");
        let s = store.replace_source(TokenSource::File, TokenSet::from([(a, ia2)]));
        assert_eq!((s.added, s.updated, s.removed), (0, 1, 1));
        assert_eq!(store.lookup(&a).unwrap().kind, TokenKind::Admin);
        assert!(store.lookup(&b).is_none());
    }

    #[test]
    fn file_wins_over_unleash_and_unshadows_on_removal() {
        let store = TokenStore::new();
        let (a, from_unleash) = info(TokenKind::Client, TokenSource::Unleash, "a");
        let (_, from_file) = info(TokenKind::Frontend, TokenSource::File, "a");
        store.replace_source(TokenSource::Unleash, TokenSet::from([(a, from_unleash)]));
        store.replace_source(TokenSource::File, TokenSet::from([(a, from_file)]));
        assert_eq!(store.lookup(&a).unwrap().kind, TokenKind::Frontend);
        assert_eq!(store.counts(), vec![(TokenKind::Frontend, TokenSource::File, 1)]);
        store.replace_source(TokenSource::File, TokenSet::new());
        assert_eq!(store.lookup(&a).unwrap().kind, TokenKind::Client);
    }
}
