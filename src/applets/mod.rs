//! The applet table and the multiplexer: `basename(argv[0])` or the first
//! argument picks the applet. Adding an applet is adding a file here and a
//! row in [`APPLETS`].

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, EXIT_USAGE};

mod bench;
mod cat;
mod daemon;
mod discoverer;
pub mod exporter;
pub mod import;
mod ls;
mod monitor;
pub mod pipe;
mod proxy;
mod serve;
mod ssh_importer;

/// One applet: its subcommand name, the names it is installed as, a
/// one-line summary for `dipus --help`, and its entry point, which gets the
/// name it was called by and its arguments.
pub struct Applet {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub summary: &'static str,
    pub main: fn(&str, &[&str]) -> Result<(), Error>,
}

pub const APPLETS: &[Applet] = &[
    Applet {
        name: "bench",
        aliases: &[],
        summary: "measure a path: throughput, request/response, connection setup (like iperf)",
        main: bench::main,
    },
    Applet {
        name: "cat",
        aliases: &["dcat"],
        summary: "pipe FILEs (or stdin) through a service and its reply to stdout",
        main: cat::main,
    },
    Applet {
        name: "daemon",
        aliases: &["dipusd"],
        summary: "exporter, discovery, importers, reaper and default services in one process",
        main: daemon::main,
    },
    Applet {
        name: "discoverer",
        aliases: &["dipus-discoverer"],
        summary: "find exporters on the LAN by UDP broadcast",
        main: discoverer::main,
    },
    Applet {
        name: "export-pipe",
        aliases: &["dipus-export-pipe"],
        summary: "serve a stdin/stdout command as a service offered to the LAN",
        main: pipe::export_main,
    },
    Applet {
        name: "export-proxy",
        aliases: &["dipus-export-proxy"],
        summary: "offer an existing UNIX socket to the LAN as a service",
        main: proxy::export_main,
    },
    Applet {
        name: "exporter",
        aliases: &["dipus-exporter"],
        summary: "offer exported/ to the LAN over TCP (SEP/1)",
        main: exporter::main,
    },
    Applet {
        name: "import",
        aliases: &["dipus-import"],
        summary: "mirror a remote host's services as local sockets, kept in sync",
        main: import::main,
    },
    Applet {
        name: "local-pipe",
        aliases: &["dipus-local-pipe"],
        summary: "serve a stdin/stdout command as a service on this host",
        main: pipe::local_main,
    },
    Applet {
        name: "local-proxy",
        aliases: &["dipus-local-proxy"],
        summary: "put an existing UNIX socket in the tree as a service",
        main: proxy::local_main,
    },
    Applet { name: "ls", aliases: &["dls"], summary: "list services, once or live (-w)", main: ls::main },
    Applet {
        name: "monitor",
        aliases: &["dipus-service-monitor"],
        summary: "print + PATH / - PATH as services appear and vanish",
        main: monitor::main,
    },
    Applet {
        name: "serve",
        aliases: &[],
        summary: "answer one SEP/1 request on stdin/stdout (run remotely by ssh://)",
        main: serve::main,
    },
    Applet {
        name: "ssh-importer",
        aliases: &["dipus-ssh-importer"],
        summary: "import over ssh from given or discovered hosts into your own scope",
        main: ssh_importer::main,
    },
];

fn find(name: &str) -> Option<&'static Applet> {
    APPLETS.iter().find(|applet| applet.name == name || applet.aliases.contains(&name))
}

fn usage() -> String {
    let mut text = format!(
        "dipus {} — distributed IPC by proxying UNIX sockets\n\n\
         Usage: dipus APPLET [ARGS…]   or, through a symlink, APPLET-NAME [ARGS…]\n\n\
         Applets:\n",
        env!("CARGO_PKG_VERSION")
    );
    for applet in APPLETS {
        let names = std::iter::once(applet.name).chain(applet.aliases.iter().copied()).collect::<Vec<_>>().join(", ");
        text.push_str(&format!("  {names:<40} {}\n", applet.summary));
    }
    text.push_str(
        "\nEach applet takes --help. Environment: DIPUS_ROOT (default /tmp/dipus), DIPUS_HOSTNAME, RUST_LOG.\n",
    );
    text
}

fn known_names() -> String {
    APPLETS.iter().flat_map(|a| std::iter::once(a.name).chain(a.aliases.iter().copied())).collect::<Vec<_>>().join(", ")
}

/// Runs the applet `args` name and returns the exit status.
pub fn dispatch(raw_args: &[OsString]) -> i32 {
    // The names that pick the applet are matched lossily: a name that is
    // not UTF-8 is no applet's, and gets the multiplexer's answer.
    let args: Vec<String> = raw_args.iter().map(|arg| arg.to_string_lossy().into_owned()).collect();
    let invoked = args
        .first()
        .map(|arg0| Path::new(arg0).file_name().and_then(|n| n.to_str()).unwrap_or("dipus"))
        .unwrap_or("dipus");
    let (applet, skipped) = match find(invoked) {
        Some(applet) => (applet, args.len().min(1)),
        None => match args.get(1).map(String::as_str) {
            None | Some("--help") | Some("-h") | Some("help") => {
                print_quietly(&usage());
                return if args.len() < 2 { EXIT_USAGE } else { 0 };
            }
            Some("--version") | Some("-V") => {
                print_quietly(&format!("dipus {}\n", env!("CARGO_PKG_VERSION")));
                return 0;
            }
            Some("--list") => {
                let names: String = APPLETS
                    .iter()
                    .flat_map(|a| std::iter::once(a.name).chain(a.aliases.iter().copied()))
                    .map(|name| format!("{name}\n"))
                    .collect();
                print_quietly(&names);
                return 0;
            }
            Some(name) => match find(name) {
                Some(applet) => (applet, 2),
                None => {
                    // Through a symlink of a name no applet has (`dipus-serve`),
                    // the argument taken for the applet's name is a surprise.
                    let how = if invoked == "dipus" {
                        String::new()
                    } else {
                        format!(" (run as {invoked:?}, which is no applet's name, so the first argument must be one)")
                    };
                    eprint_quietly(&format!("dipus: unknown applet {name:?}{how}; known applets: {}\n", known_names()));
                    return EXIT_USAGE;
                }
            },
        },
    };
    let display_name = applet.aliases.first().copied().unwrap_or(applet.name);
    let result = applet_arguments(&raw_args[skipped..]).and_then(|rest| {
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        (applet.main)(display_name, &rest)
    });
    match result {
        Ok(()) => 0,
        Err(error) => {
            eprint_quietly(&format!("{display_name}: {error}\n"));
            error.exit_status()
        }
    }
}

/// The applet's arguments as text. Names, selectors and URIs are UTF-8 by
/// definition, and the applets take their FILE arguments as text too: an
/// argument that is not UTF-8 is refused here, naming it, rather than
/// mangled into a different file name.
fn applet_arguments(raw_args: &[OsString]) -> Result<Vec<String>, Error> {
    raw_args
        .iter()
        .map(|arg| {
            arg.clone().into_string().map_err(|arg| {
                Error::Usage(format!("argument {arg:?} is not valid UTF-8 (dipus takes names and paths in UTF-8)"))
            })
        })
        .collect()
}

/// What became of output to stdout: `Ok(true)` written, `Ok(false)` the
/// reader went away (`| head -1`: their choice, so the applet ends
/// quietly), and an error where the output was lost otherwise (a full
/// disk, EIO), which a script must not take for success.
pub fn written(result: std::io::Result<()>) -> Result<bool, Error> {
    match result {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(error) => Err(Error::io("cannot write to stdout", error)),
    }
}

/// Prints help and listings. The reader may be gone (`dipus --list | head
/// -1`): with SIGPIPE ignored, `print!` would panic on EPIPE, and there is
/// no one left to tell.
pub fn print_quietly(text: &str) {
    write_quietly(std::io::stdout().lock(), text);
}

/// Prints messages on stderr, which may be a pipe whose reader is gone
/// (`dcat x 2>&1 | head -1`) as well; `eprint!` would panic there.
pub fn eprint_quietly(text: &str) {
    write_quietly(std::io::stderr().lock(), text);
}

fn write_quietly(mut out: impl Write, text: &str) {
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Parses an applet's arguments with argh; `--help` prints and exits 0, a
/// usage error prints and exits 64.
///
/// Every applet's `Args` carries `#[argh(help_triggers("--help"))]`:
/// argh's default also takes a bare `help` for `--help`, anywhere before
/// the options end, so a service, selector or FILE called `help` would
/// print usage and exit 0 instead of being used. That cannot be undone
/// here, after argh has parsed (a stand-in word could not be put back into
/// the applet's fields), hence the attribute; `tests/multicall.rs` checks
/// every applet for it.
pub fn parse_args<T: argh::FromArgs>(name: &str, args: &[&str]) -> T {
    let args = end_options_at_double_dash::<T>(name, args);
    match T::from_args(&[name], &args) {
        Ok(parsed) => parsed,
        Err(early) => match early.status {
            Ok(()) => {
                print_quietly(&early.output);
                std::process::exit(0);
            }
            Err(()) => {
                let newline = if early.output.ends_with('\n') { "" } else { "\n" };
                eprint_quietly(&format!("{name}: {}{newline}Run {name} --help for usage.\n", early.output));
                std::process::exit(EXIT_USAGE);
            }
        },
    }
}

/// The arguments with the first `--` dropped where argh would take it for
/// a value. The first `--` ends the options wherever it comes, as getopt
/// has it (`cat a -- -v`), but argh also ends them at the first value of a
/// greedy positional (dcat's FILEs, dls's SELECTORs) and from then on
/// takes a `--` for one more value: `dcat sorter a -- -v` would send a
/// file called `--`. After that point every argument is a value, so
/// dropping the `--` leaves the rest as it is.
///
/// Whether argh's options have ended by then is asked of argh itself:
/// there, and only there, two `--help`s in its place parse as values.
/// Where options are open, the first is taken for help; after an option
/// that wants a value, the second is.
fn end_options_at_double_dash<'a, T: argh::FromArgs>(name: &str, args: &[&'a str]) -> Vec<&'a str> {
    let mut args = args.to_vec();
    if let Some(at) = args.iter().position(|&arg| arg == "--") {
        let mut probe = args[..at].to_vec();
        probe.extend(["--help", "--help"]);
        if T::from_args(&[name], &probe).is_ok() {
            args.remove(at);
        }
    }
    args
}

/// The UDP port of discovery: `DIPUS_DISCOVERY_PORT`, else 7347.
pub fn discovery_port() -> Result<u16, Error> {
    Ok(crate::settings::port("DIPUS_DISCOVERY_PORT", crate::datagram::DISCOVERY_PORT)?)
}

/// The host name services are created under: `DIPUS_HOSTNAME`, or the
/// short host name.
pub fn host_name() -> Result<String, Error> {
    let host = match crate::settings::text("DIPUS_HOSTNAME")? {
        Some(host) => host,
        None => {
            let full = nix::unistd::gethostname().map_err(|e| Error::io("cannot read the host name", e.into()))?;
            let full = full.to_string_lossy().into_owned();
            full.split('.').next().unwrap_or("localhost").to_string()
        }
    };
    crate::name::validate_host(&host)?;
    Ok(host)
}
