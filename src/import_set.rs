//! Many importers in one event loop, as dipusd and dipus-ssh-importer run
//! them: each is started under a key (a host name or URI), gets a token
//! component of its own and the per-host lock, and is stopped (its proxies
//! removed) by key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::Registry;

use crate::event_loop::{self, earliest};
use crate::import::{Dialer, HostLock, ImportConfig, ImportError, Importer};
use crate::name::Scope;
use crate::resolve::{resolve, Lookup, Resolution};
use crate::tree::{SocketOptions, Tree};

struct Import {
    importer: Importer,
    component: u8,
    lock: HostLock,
}

/// An import asked for: under `key`, what `selector` picks (everything
/// if `None`) of the exporter `dialer` reaches.
struct Wanted {
    key: String,
    dialer: Dialer,
    selector: Option<String>,
}

/// An import another process holds the lock of, tried again now and then:
/// when that process ends, this one takes over.
struct Waiting {
    wanted: Wanted,
    next_try: Instant,
}

/// An import whose host name is being looked up, for its lock: that is
/// taken per address, so that two spellings of one host are one import.
/// The lookup holds the component the import will have.
struct Resolving {
    lookup: Lookup,
    wanted: Wanted,
    component: u8,
    /// A retry of a waiting import (see [`Waiting`]).
    retry: bool,
}

/// How often a held lock is tried again.
const LOCK_RETRY: Duration = Duration::from_secs(10);

pub struct ImportSet {
    tree: Tree,
    scope: Scope,
    options: SocketOptions,
    /// This host's name (see [`ImportConfig::own_host`]).
    own_host: Option<String>,
    imports: HashMap<String, Import>,
    free_components: Vec<u8>,
    key_of: HashMap<u8, String>,
    waiting: HashMap<String, Waiting>,
    resolving: HashMap<String, Resolving>,
    /// Stopped imports whose relayed connections still run, by component.
    retiring: HashMap<u8, Importer>,
}

impl ImportSet {
    /// Importers take the token components from `first` to 255; `own_host`
    /// is this host's name, so that it is never imported into itself.
    pub fn new(tree: Tree, scope: Scope, options: SocketOptions, own_host: Option<String>, first: u8) -> ImportSet {
        ImportSet {
            tree,
            scope,
            options,
            own_host,
            imports: HashMap::new(),
            free_components: (first..=u8::MAX).rev().collect(),
            key_of: HashMap::new(),
            waiting: HashMap::new(),
            resolving: HashMap::new(),
            retiring: HashMap::new(),
        }
    }

    /// [`ImportSet::start`], for a daemon: a host another process is
    /// importing is tried again every 10 s until that process lets go of
    /// it (or [`ImportSet::stop`]); other failures are logged. A sep://
    /// host name is looked up first, without waiting for the answer here.
    pub fn start_or_wait(&mut self, registry: &Registry, key: String, dialer: Dialer, selector: Option<String>) {
        self.begin(registry, Wanted { key, dialer, selector }, false);
    }

    fn begin(&mut self, registry: &Registry, wanted: Wanted, retry: bool) {
        if self.imports.contains_key(&wanted.key) || self.resolving.contains_key(&wanted.key) {
            return;
        }
        let Dialer::Sep(server) = &wanted.dialer else {
            return self.finish(registry, wanted, &[], retry);
        };
        let lookup = match resolve(&server.host, server.port) {
            Ok(Resolution::Done(addresses)) => return self.finish(registry, wanted, &addresses, retry),
            Ok(Resolution::Pending(lookup)) => lookup,
            Err(error) => {
                log::info!("{}: cannot look up {} ({error}); locking it by name", wanted.key, server.host);
                return self.finish(registry, wanted, &[], retry);
            }
        };
        let Some(component) = self.free_components.pop() else {
            return log::warn!("{}: {}", wanted.key, ImportError::TooMany { uri: wanted.dialer.uri() });
        };
        let fd = lookup.fd();
        if let Err(error) =
            registry.register(&mut mio::unix::SourceFd(&fd), event_loop::token(component, 0), Interest::READABLE)
        {
            self.free_components.push(component);
            log::info!("{}: cannot look up {} ({error}); locking it by name", wanted.key, server.host);
            return self.finish(registry, wanted, &[], retry);
        }
        self.key_of.insert(component, wanted.key.clone());
        self.resolving.insert(wanted.key.clone(), Resolving { lookup, wanted, component, retry });
    }

    /// Takes the lock and starts the import, or says why not.
    fn finish(&mut self, registry: &Registry, wanted: Wanted, addresses: &[SocketAddr], retry: bool) {
        let key = wanted.key.clone();
        match self.start_at(registry, &wanted, addresses) {
            Ok(()) if retry => log::info!("{key}: its lock is free now; importing"),
            Ok(()) => {}
            // Held by another import here (two URIs of one host): waiting
            // would only end when that one is stopped.
            Err(ImportError::AlreadyImported { ref lock, .. })
                if self.imports.values().any(|import| import.lock.holds(lock)) =>
            {
                log::warn!("{key}: this host is imported here already; not importing it twice");
            }
            Err(error @ ImportError::AlreadyImported { .. }) => {
                if !retry {
                    log::warn!("{key}: {error}; trying again every {} s", LOCK_RETRY.as_secs());
                }
                self.waiting.insert(key, Waiting { wanted, next_try: Instant::now() + LOCK_RETRY });
            }
            Err(error) => log::warn!("{key}: {error}"),
        }
    }

    /// A lookup has news: with an answer, the import goes on to its lock.
    fn lookup_answered(&mut self, registry: &Registry, key: &str, now: Instant) {
        let Some(resolving) = self.resolving.get_mut(key) else { return };
        let Some(answer) = resolving.lookup.answer(now) else { return };
        let Some(Resolving { lookup, wanted, component, retry }) = self.resolving.remove(key) else {
            return;
        };
        let _ = registry.deregister(&mut mio::unix::SourceFd(&lookup.fd()));
        drop(lookup);
        self.key_of.remove(&component);
        self.free_components.push(component);
        let addresses = answer.unwrap_or_else(|message| {
            // The importer keeps trying the name; meanwhile the lock is
            // by name.
            log::info!("{key}: {message}; locking it by name");
            Vec::new()
        });
        self.finish(registry, wanted, &addresses, retry);
    }

    /// Starts importing what `selector` picks (everything if `None`); a
    /// sep:// host is locked by name (see [`ImportSet::start_or_wait`]).
    pub fn start(
        &mut self,
        registry: &Registry,
        key: String,
        dialer: Dialer,
        selector: Option<String>,
    ) -> Result<(), ImportError> {
        self.start_at(registry, &Wanted { key, dialer, selector }, &[])
    }

    /// [`ImportSet::start`], with the lock taken on `addresses`, where
    /// the host's name leads (or by name if there are none).
    fn start_at(&mut self, registry: &Registry, wanted: &Wanted, addresses: &[SocketAddr]) -> Result<(), ImportError> {
        let Wanted { key, dialer, selector } = wanted;
        if self.imports.contains_key(key) {
            return Ok(());
        }
        let Some(component) = self.free_components.pop() else {
            return Err(ImportError::TooMany { uri: dialer.uri() });
        };
        let lock = match HostLock::acquire(&self.tree.scope_dir(&self.scope), dialer, addresses) {
            Ok(lock) => lock,
            Err(error) => {
                self.free_components.push(component);
                return Err(error);
            }
        };
        let config = ImportConfig {
            dialer: dialer.clone(),
            selector: selector.clone(),
            scope: self.scope.clone(),
            options: self.options.clone(),
            own_host: self.own_host.clone(),
        };
        let mut importer = Importer::new(self.tree.clone(), config, component);
        importer.start_at(addresses);
        importer.handle_timers(registry);
        self.key_of.insert(component, key.clone());
        self.imports.insert(key.clone(), Import { importer, component, lock });
        Ok(())
    }

    /// Stops importing under `key`: its proxies go at once, and its lock
    /// (the host may come back under another key), but connections already
    /// relayed run on until they end, as when the session is lost.
    pub fn stop(&mut self, registry: &Registry, key: &str) {
        self.forget(registry, key);
        if let Some(Import { mut importer, component, lock }) = self.imports.remove(key) {
            drop(lock);
            self.key_of.remove(&component);
            importer.retire(registry);
            if importer.is_finished() {
                self.free_components.push(component);
            } else {
                self.retiring.insert(component, importer);
            }
        }
    }

    /// The tree was removed and made again, and every import's lock and
    /// proxies went with the old one: each import is started afresh (its
    /// lock taken again, its proxies made at its first sync). Connections
    /// already relayed run on until they end.
    pub fn restart_all(&mut self, registry: &Registry) {
        let wanted: Vec<Wanted> = self
            .imports
            .iter()
            .map(|(key, import)| {
                let config = import.importer.config();
                Wanted { key: key.clone(), dialer: config.dialer.clone(), selector: config.selector.clone() }
            })
            .collect();
        for wanted in wanted {
            log::info!("{}: importing again into the new tree", wanted.key);
            self.stop(registry, &wanted.key);
            self.begin(registry, wanted, false);
        }
    }

    /// Everything stops, connections included (the process is ending).
    pub fn stop_all(&mut self, registry: &Registry) {
        let keys: Vec<String> =
            self.imports.keys().chain(self.resolving.keys()).chain(self.waiting.keys()).cloned().collect();
        for key in keys {
            self.forget(registry, &key);
            if let Some(mut import) = self.imports.remove(&key) {
                import.importer.shutdown(registry);
                self.key_of.remove(&import.component);
                self.free_components.push(import.component);
            }
        }
        for (component, mut importer) in self.retiring.drain() {
            importer.shutdown(registry);
            self.free_components.push(component);
        }
    }

    /// Drops a waiting or resolving import under `key`.
    fn forget(&mut self, registry: &Registry, key: &str) {
        self.waiting.remove(key);
        if let Some(resolving) = self.resolving.remove(key) {
            let _ = registry.deregister(&mut mio::unix::SourceFd(&resolving.lookup.fd()));
            self.key_of.remove(&resolving.component);
            self.free_components.push(resolving.component);
        }
    }

    /// Lets go of the retired importers with nothing left running.
    fn release_finished(&mut self) {
        let finished: Vec<u8> =
            self.retiring.iter().filter(|(_, importer)| importer.is_finished()).map(|(&c, _)| c).collect();
        for component in finished {
            self.retiring.remove(&component);
            self.free_components.push(component);
        }
    }

    /// The host behind `key` seems to be back: skip what is left of its
    /// backoff.
    pub fn retry_now(&mut self, key: &str) {
        if let Some(import) = self.imports.get_mut(key) {
            import.importer.retry_now();
        }
    }

    pub fn handle_event(&mut self, registry: &Registry, event: &mio::event::Event) {
        let component = event_loop::component(event.token());
        if let Some(importer) = self.retiring.get_mut(&component) {
            importer.handle_event(registry, event);
            return self.release_finished();
        }
        let Some(key) = self.key_of.get(&component).cloned() else { return };
        match self.imports.get_mut(&key) {
            Some(import) => import.importer.handle_event(registry, event),
            None => self.lookup_answered(registry, &key, Instant::now()),
        }
    }

    pub fn handle_timers(&mut self, registry: &Registry) {
        let now = Instant::now();
        let due: Vec<String> =
            self.waiting.iter().filter(|(_, waiting)| waiting.next_try <= now).map(|(key, _)| key.clone()).collect();
        for key in due {
            let Some(waiting) = self.waiting.remove(&key) else { continue };
            // Looked up again: the name may lead elsewhere by now.
            self.begin(registry, waiting.wanted, true);
        }
        let overdue: Vec<String> = self
            .resolving
            .iter()
            .filter(|(_, resolving)| resolving.lookup.deadline() <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for key in overdue {
            self.lookup_answered(registry, &key, now);
        }
        for importer in self.retiring.values_mut() {
            importer.handle_timers(registry);
        }
        self.release_finished();
        for import in self.imports.values_mut() {
            import.importer.handle_timers(registry);
            for event in import.importer.take_events() {
                log::debug!("{}: {event:?}", import.importer.uri());
            }
        }
    }

    pub fn timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let waiting = self
            .waiting
            .values()
            .map(|waiting| waiting.next_try)
            .chain(self.resolving.values().map(|resolving| resolving.lookup.deadline()))
            .map(|when| when.saturating_duration_since(now))
            .min();
        let importers = self.imports.values().map(|import| &import.importer).chain(self.retiring.values());
        importers.fold(waiting, |timeout, importer| earliest(timeout, importer.timeout()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sep_client::Server;

    /// A `--host sep://NAME` is looked up once at start: the answer the
    /// lock is taken on is where the first session goes (the importer
    /// used to look the name up a second time).
    #[test]
    fn a_host_name_is_looked_up_once_at_start() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("dipus-import-set-once-{}", std::process::id()));
        let tree = Tree::at(dir.clone()).unwrap();
        tree.ensure_scope(&Scope::Imported).unwrap();
        let mut poll = mio::Poll::new().unwrap();
        let mut set = ImportSet::new(tree, Scope::Imported, SocketOptions::default(), None, 16);
        let key = "sep://localhost".to_string();
        // localhost comes from /etc/hosts, without a nameserver.
        set.start_or_wait(poll.registry(), key.clone(), Dialer::Sep(Server::new("localhost", Some(port))), None);
        assert!(set.resolving.contains_key(&key), "the name is looked up for the lock");
        let mut events = mio::Events::with_capacity(8);
        let deadline = Instant::now() + Duration::from_secs(10);
        while set.resolving.contains_key(&key) && Instant::now() < deadline {
            poll.poll(&mut events, Some(Duration::from_millis(100))).unwrap();
            for event in events.iter() {
                set.handle_event(poll.registry(), event);
            }
        }
        let import = set.imports.get(&key).expect("the import started once the lookup answered");
        assert!(!import.importer.is_looking_up(), "the importer looks the name up a second time");
        set.stop_all(poll.registry());
        drop(listener);
        let _ = std::fs::remove_dir_all(dir);
    }
}
