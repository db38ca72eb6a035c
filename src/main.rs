//! dipus: distributed IPC by proxying UNIX sockets.
//!
//! One executable, busybox-style: the applet is chosen by the name it was
//! run as (`dcat`, `dls`, `dipusd`, …) or by its first argument
//! (`dipus cat …`). See `applets` for the table.

mod allow;
mod applets;
mod datagram;
mod discovery;
mod error;
mod event_loop;
mod exporter;
mod forked;
mod import;
mod import_set;
mod linger;
mod name;
mod net;
mod netlink;
mod pidfile;
mod probe;
mod reaper;
mod relay;
mod resolve;
mod selector;
mod sep;
mod sep_client;
mod sep_server;
mod services;
mod settings;
mod signals;
mod ssh;
mod ssh_mux;
mod stdio;
#[cfg(test)]
mod test_random;
mod transport;
mod tree;
mod watch;

fn main() {
    // A write to a closed socket or pipe must be an error we handle
    // (EPIPE), not a silent death.
    // SAFETY: setting a signal disposition before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    // Not `env::args()`: it panics on an argument that is not UTF-8.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    std::process::exit(applets::dispatch(&args));
}
