//! dcat — pipe data through a service.
//!
//! Usage: dcat [-v] SERVICE [FILE…]
//!
//! Connects to the first service that SERVICE selects and accepts (falling
//! over to the next on a refused or vanished socket), sends each FILE in
//! order (`-` is stdin; no FILE means stdin), then shuts down its write side
//! and copies the service's reply to stdout until the service closes.
//! SERVICE is a selector (`lame`, `madplay.stereo`, `text/plain/sorter`, an
//! absolute socket path) or a `sep://` / `ssh://` URI.
//!
//! Exit status: 0 done; 64 usage; 69 no such service, or none accepted;
//! 74 an I/O error. A closed stdout (`dcat x | head -1`) ends quietly.

use std::fs::File;
use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use argh::FromArgs;

use crate::error::Error;
use crate::relay::{self, Relay, Way};
use crate::selector::Target;
use crate::transport::{self, Stream};

#[derive(FromArgs)]
#[argh(help_triggers("--help"))]
/// Pipe FILEs (or stdin) through SERVICE and copy its reply to stdout.
struct Args {
    /// report on stderr which service was used
    #[argh(switch, short = 'v')]
    verbose: bool,
    /// the service: a selector or a sep:// or ssh:// URI
    #[argh(positional)]
    service: String,
    /// files to send in order; - is stdin (default: stdin)
    #[argh(positional, greedy)]
    files: Vec<String>,
}

enum Input {
    Stdin,
    /// An open file and the name it was given as.
    File(File, String),
}

/// argh takes a lone `-` right after SERVICE for an option it does not
/// know; while the arguments are parsed a NUL, which no file name can
/// hold, stands for it.
const STDIN_ARG: &str = "\0";

pub fn main(name: &str, args: &[&str]) -> Result<(), Error> {
    let args: Vec<&str> = args.iter().map(|&arg| if arg == "-" { STDIN_ARG } else { arg }).collect();
    let mut args: Args = crate::applets::parse_args(name, &args);
    if args.service == STDIN_ARG {
        args.service = "-".into();
    }
    let target = Target::parse(&args.service)?;
    // `dcat x >&-` fails writing the reply, as cat does, not silently.
    crate::stdio::reclose();
    make_room_for(args.files.iter().filter(|path| !matches!(path.as_str(), "-" | STDIN_ARG)).count())?;
    // Open every file first, so a typo (or a directory) fails before
    // anything is sent.
    let inputs = args
        .files
        .iter()
        .map(|path| match path.as_str() {
            "-" | STDIN_ARG => Ok(Input::Stdin),
            path => open_input(path).map(|file| Input::File(file, path.to_string())),
        })
        .collect::<Result<Vec<Input>, Error>>()?;
    let connection = transport::connect(&target)?;
    if args.verbose {
        crate::applets::eprint_quietly(&format!("{name}: connected to {}\n", connection.description));
    }
    let socket_relay = |socket: std::os::fd::OwnedFd| -> Result<Relay, Error> {
        let socket = UnixStream::from(socket);
        socket.set_nonblocking(true).map_err(|e| Error::io("cannot set up the connection", e))?;
        let fd = socket.as_raw_fd();
        let mut relay = Relay::new(&sources(&inputs), fd, fd, libc::STDOUT_FILENO);
        relay.adopt(socket.into());
        Ok(relay)
    };
    match connection.stream {
        Stream::Socket(socket) => pipe_through(socket_relay(socket)?, &inputs).map(drop),
        Stream::Forwarded(socket, ssh) => match pipe_through(socket_relay(socket)?, &inputs)? {
            // ssh's master closes what it carries when its connection
            // dies, as a service ending its reply would.
            Reply::Ended => Ok(ssh.check_connection(&crate::tree::Tree::from_env()?)?),
            Reply::Unread => Ok(()),
        },
        Stream::Ssh(mut channel) => {
            let input = channel.input.take().expect("a fresh channel has its input");
            let mut relay =
                Relay::new(&sources(&inputs), input.as_raw_fd(), channel.output.as_raw_fd(), libc::STDOUT_FILENO);
            // The relay closes ssh's stdin at the end of our input: that is
            // how the remote service sees EOF.
            relay.adopt(input);
            match pipe_through(relay, &inputs)? {
                // ssh's exit status says whether the reply ended or its
                // connection did.
                Reply::Ended => Ok(channel.finish()?),
                // ssh may be stuck writing what nobody reads: dropping
                // the channel ends it.
                Reply::Unread => Ok(()),
            }
        }
    }
}

/// How the copy of the reply ended.
enum Reply {
    /// The service's side ended it.
    Ended,
    /// stdout was closed by its reader (`| head -1`).
    Unread,
}

/// The descriptors to send, in order.
fn sources(inputs: &[Input]) -> Vec<RawFd> {
    if inputs.is_empty() {
        vec![libc::STDIN_FILENO]
    } else {
        inputs
            .iter()
            .map(|input| match input {
                Input::Stdin => libc::STDIN_FILENO,
                Input::File(file, _) => file.as_raw_fd(),
            })
            .collect()
    }
}

/// Descriptors dcat needs beside its FILEs: stdio, the connection, the
/// poller, a splice pipe, and for ssh:// ssh's pipes and control socket.
const SPARE_DESCRIPTORS: u64 = 32;

/// Every FILE is held open from before connecting to the end, so that one
/// that cannot be opened is refused before anything is sent; `dcat lame
/// *.wav` may then need more descriptors than the soft limit allows. The
/// limit is raised only then (ssh, started for ssh://, inherits it), and
/// FILEs past the hard limit are refused before any is opened.
fn make_room_for(files: usize) -> Result<(), Error> {
    use nix::sys::resource::{getrlimit, Resource};
    let needed = files as u64 + SPARE_DESCRIPTORS;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return Ok(());
    };
    if needed <= soft {
        return Ok(());
    }
    if needed > hard {
        return Err(Error::TooManyFiles { count: files, limit: hard });
    }
    crate::net::raise_fd_limit();
    Ok(())
}

/// A FILE to send, refused at once if it is a directory (which opens, and
/// fails only when read: after the service has seen the files before it).
fn open_input(path: &str) -> Result<File, Error> {
    let open_error = |source| Error::Open { path: path.into(), source };
    let file = File::open(path).map_err(open_error)?;
    if file.metadata().map_err(open_error)?.is_dir() {
        return Err(open_error(std::io::Error::from_raw_os_error(libc::EISDIR)));
    }
    Ok(file)
}

fn pipe_through(mut relay: Relay, inputs: &[Input]) -> Result<Reply, Error> {
    // The reply decides when we are done: a service may answer before it
    // has read everything, or without reading at all.
    relay::run_until(&mut relay, |relay| relay.way_done(Way::Backward))
        .map_err(|e| Error::io(failure(relay.failed_source(), relay.failed_sink(), inputs), e))?;
    // A service may stop reading and close (it has answered): that ends
    // our input quietly. A link that failed under it lost what we sent.
    if let Some(kind @ (ErrorKind::TimedOut | ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable)) =
        relay.broken(Way::Forward)
    {
        return Err(Error::io("the connection to the service failed", kind.into()));
    }
    match relay.broken(Way::Backward) {
        // stdout was closed by its reader (`| head -1`): that is their
        // choice, not our error.
        Some(ErrorKind::BrokenPipe) => Ok(Reply::Unread),
        None => Ok(Reply::Ended),
        Some(kind) => Err(Error::io("cannot write to stdout", kind.into())),
    }
}

/// What failed, for the error: the input whose read failed, by its name,
/// or the output whose write did.
fn failure(failed_source: Option<RawFd>, failed_sink: Option<RawFd>, inputs: &[Input]) -> String {
    let named = |fd: RawFd| {
        inputs.iter().find_map(|input| match input {
            Input::File(file, path) if file.as_raw_fd() == fd => Some(format!("cannot read {path}")),
            _ => None,
        })
    };
    match (failed_source, failed_sink) {
        (Some(libc::STDIN_FILENO), _) => "cannot read stdin".to_string(),
        // Not an input: the service's connection.
        (Some(fd), _) => named(fd).unwrap_or_else(|| "the connection to the service failed".to_string()),
        (None, Some(libc::STDOUT_FILENO)) => "cannot write to stdout".to_string(),
        (None, Some(_)) => "the connection to the service failed".to_string(),
        (None, None) => "relay failed".to_string(),
    }
}
