//! Many importers in one event loop, as dipusd and dipus-ssh-importer run
//! them: each is started under a key (a host name or URI), gets a token
//! component of its own and the per-host lock, and is stopped (its proxies
//! removed) by key.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mio::Registry;

use crate::event_loop::{self, earliest};
use crate::import::{Dialer, HostLock, ImportConfig, ImportError, Importer};
use crate::name::Scope;
use crate::tree::{SocketOptions, Tree};

struct Import {
    importer: Importer,
    component: u8,
    lock: HostLock,
}

/// An import another process holds the lock of, tried again now and then:
/// when that process ends, this one takes over.
struct Waiting {
    dialer: Dialer,
    selector: Option<String>,
    next_try: Instant,
}

/// How often a held lock is tried again.
const LOCK_RETRY: Duration = Duration::from_secs(10);

pub struct ImportSet {
    tree: Tree,
    scope: Scope,
    options: SocketOptions,
    imports: HashMap<String, Import>,
    free_components: Vec<u8>,
    key_of: HashMap<u8, String>,
    waiting: HashMap<String, Waiting>,
}

impl ImportSet {
    /// Importers take the token components from `first` to 255.
    pub fn new(tree: Tree, scope: Scope, options: SocketOptions, first: u8) -> ImportSet {
        ImportSet {
            tree,
            scope,
            options,
            imports: HashMap::new(),
            free_components: (first..=u8::MAX).rev().collect(),
            key_of: HashMap::new(),
            waiting: HashMap::new(),
        }
    }

    /// [`ImportSet::start`], for a daemon: a host another process is
    /// importing is tried again every 10 s until that process lets go of
    /// it (or [`ImportSet::stop`]); other failures are logged.
    pub fn start_or_wait(&mut self, registry: &Registry, key: String, dialer: Dialer, selector: Option<String>) {
        match self.start(registry, key.clone(), dialer.clone(), selector.clone()) {
            Ok(()) => {}
            // Held by another import here (two URIs of one host): waiting
            // would only end when that one is stopped.
            Err(ImportError::AlreadyImported { ref lock, .. })
                if self.imports.values().any(|import| import.lock.holds(lock)) =>
            {
                log::warn!("{key}: this host is imported here already; not importing it twice");
            }
            Err(error @ ImportError::AlreadyImported { .. }) => {
                log::warn!("{key}: {error}; trying again every {} s", LOCK_RETRY.as_secs());
                self.waiting.insert(key, Waiting { dialer, selector, next_try: Instant::now() + LOCK_RETRY });
            }
            Err(error) => log::warn!("{key}: {error}"),
        }
    }

    /// Starts importing what `selector` picks (everything if `None`).
    pub fn start(
        &mut self,
        registry: &Registry,
        key: String,
        dialer: Dialer,
        selector: Option<String>,
    ) -> Result<(), ImportError> {
        if self.imports.contains_key(&key) {
            return Ok(());
        }
        let Some(component) = self.free_components.pop() else {
            return Err(ImportError::TooMany { uri: dialer.uri() });
        };
        let lock = match HostLock::acquire(&self.tree.scope_dir(&self.scope), &dialer) {
            Ok(lock) => lock,
            Err(error) => {
                self.free_components.push(component);
                return Err(error);
            }
        };
        let config = ImportConfig { dialer, selector, scope: self.scope.clone(), options: self.options.clone() };
        let mut importer = Importer::new(self.tree.clone(), config, component);
        importer.handle_timers(registry);
        self.key_of.insert(component, key.clone());
        self.imports.insert(key, Import { importer, component, lock });
        Ok(())
    }

    pub fn stop(&mut self, registry: &Registry, key: &str) {
        self.waiting.remove(key);
        if let Some(mut import) = self.imports.remove(key) {
            import.importer.shutdown(registry);
            self.key_of.remove(&import.component);
            self.free_components.push(import.component);
        }
    }

    pub fn stop_all(&mut self, registry: &Registry) {
        self.waiting.clear();
        let keys: Vec<String> = self.imports.keys().cloned().collect();
        for key in keys {
            self.stop(registry, &key);
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
        if let Some(import) = self.key_of.get(&component).and_then(|key| self.imports.get_mut(key)) {
            import.importer.handle_event(registry, event);
        }
    }

    pub fn handle_timers(&mut self, registry: &Registry) {
        let now = Instant::now();
        let due: Vec<String> =
            self.waiting.iter().filter(|(_, waiting)| waiting.next_try <= now).map(|(key, _)| key.clone()).collect();
        for key in due {
            let Some(waiting) = self.waiting.remove(&key) else { continue };
            match self.start(registry, key.clone(), waiting.dialer.clone(), waiting.selector.clone()) {
                Ok(()) => log::info!("{key}: its lock is free now; importing"),
                Err(ImportError::AlreadyImported { .. }) => {
                    self.waiting.insert(key, Waiting { next_try: now + LOCK_RETRY, ..waiting });
                }
                Err(error) => log::warn!("{key}: {error}"),
            }
        }
        for import in self.imports.values_mut() {
            import.importer.handle_timers(registry);
            for event in import.importer.take_events() {
                log::debug!("{}: {event:?}", import.importer.uri());
            }
        }
    }

    pub fn timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let waiting = self.waiting.values().map(|waiting| waiting.next_try.saturating_duration_since(now)).min();
        self.imports.values().fold(waiting, |timeout, import| earliest(timeout, import.importer.timeout()))
    }
}
