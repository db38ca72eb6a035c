//! The client side of SEP/1 over TCP: open a request to an exporter and
//! read its status line without reading past it, LIST, and the WATCH
//! stream. dcat, dls and the importer use it.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::Duration;

use thiserror::Error;

use crate::sep::{self, Request, SepError, StatusLine};

/// How long a client waits for a TCP connection and for a status line.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("cannot connect to {address}: {source}")]
    Connect { address: String, source: io::Error },
    #[error("{address}: {source}")]
    Protocol { address: String, source: SepError },
    #[error("{address} answered: {}", status.to_line().trim_end())]
    Refused { address: String, status: StatusLine },
}

/// Where an exporter is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Server {
    pub host: String,
    pub port: u16,
}

impl Server {
    pub fn new(host: &str, port: Option<u16>) -> Server {
        Server { host: host.to_string(), port: port.unwrap_or(sep::DEFAULT_PORT) }
    }

    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn addresses(&self) -> Result<Vec<SocketAddr>, ClientError> {
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map(Iterator::collect)
            .map_err(|source| ClientError::Resolve { host: self.host.clone(), source })
    }

    /// A tuned TCP connection to the exporter (blocking).
    pub fn connect(&self) -> Result<TcpStream, ClientError> {
        let mut last = None;
        for address in self.addresses()? {
            match TcpStream::connect_timeout(&address, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    let _ = crate::net::tune_tcp(stream.as_raw_fd());
                    return Ok(stream);
                }
                Err(error) => last = Some(error),
            }
        }
        Err(ClientError::Connect {
            address: self.authority(),
            source: last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")),
        })
    }

    /// Sends `request` and reads the status line; on 200 the stream is
    /// positioned just after it.
    pub fn request(&self, request: &Request) -> Result<TcpStream, ClientError> {
        let protocol = |source| ClientError::Protocol { address: self.authority(), source };
        // A selector from the command line must not smuggle a second line.
        request.validate().map_err(protocol)?;
        let mut stream = self.connect()?;
        stream.write_all(request.to_line().as_bytes()).map_err(|e| protocol(SepError::Io(e)))?;
        let status = read_status(&mut stream).map_err(protocol)?;
        if !status.status.is_success() {
            return Err(ClientError::Refused { address: self.authority(), status });
        }
        if matches!(request, Request::Connect(_)) {
            let _ = crate::net::relaying(stream.as_raw_fd());
        }
        Ok(stream)
    }

    /// LIST: the wire paths of the services `selector` picks.
    pub fn list(&self, selector: Option<&str>) -> Result<Vec<String>, ClientError> {
        let stream = self.request(&Request::List(selector.map(str::to_string)))?;
        let protocol = |source| ClientError::Protocol { address: self.authority(), source };
        read_list(stream).map_err(protocol)
    }
}

/// Reads a status line with a deadline, byte by byte so nothing after it
/// is consumed.
pub fn read_status(stream: &mut TcpStream) -> Result<StatusLine, SepError> {
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(SepError::Io)?;
    let line = sep::read_line(stream, sep::MAX_REQUEST_LINE).map_err(|error| match error {
        // The read timeout shows as EAGAIN: say what it means.
        SepError::Io(io) if matches!(io.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            let why = format!("no status line within {} s", REPLY_TIMEOUT.as_secs());
            SepError::Io(io::Error::new(io::ErrorKind::TimedOut, why))
        }
        other => other,
    })?;
    stream.set_read_timeout(None).map_err(SepError::Io)?;
    StatusLine::parse(&line)
}

/// The lines of a LIST reply, until the server closes: at most
/// [`sep::MAX_SERVICES`] of them.
pub fn read_list<R: io::Read>(reader: R) -> Result<Vec<String>, SepError> {
    let mut reader = io::BufReader::new(reader);
    let mut paths = Vec::new();
    loop {
        let mut line = Vec::new();
        // Bounded: a hostile server cannot make one line eat memory.
        let mut limited = io::Read::take(&mut reader, sep::MAX_REQUEST_LINE as u64 + 1);
        match io::BufRead::read_until(&mut limited, b'\n', &mut line) {
            Ok(0) => return Ok(paths),
            Ok(_) if line.len() > sep::MAX_REQUEST_LINE => {
                return Err(SepError::LineTooLong { limit: sep::MAX_REQUEST_LINE, start: String::new() })
            }
            Ok(_) if paths.len() == sep::MAX_SERVICES => {
                return Err(SepError::TooManyServices { limit: sep::MAX_SERVICES })
            }
            Ok(_) => paths.push(sep::parse_list_line(&line)?),
            Err(error) => return Err(SepError::Io(error)),
        }
    }
}

/// Lines from a blocking stream (a TCP socket or ssh's stdout pipe), each
/// within a deadline of silence: a WATCH peer that says nothing for three
/// keepalives is gone.
pub struct LineStream {
    fd: std::os::fd::RawFd,
    buffer: Vec<u8>,
}

impl LineStream {
    /// The caller keeps `fd` open while the stream is used.
    pub fn new(fd: std::os::fd::RawFd) -> LineStream {
        LineStream { fd, buffer: Vec::new() }
    }

    /// The next line (with its `\n`), `Ok(None)` at EOF, `TimedOut` after
    /// `silence` without a byte. `output` is where the caller prints: if
    /// its reader goes away while the peer only sends keepalives, this
    /// returns `BrokenPipe` rather than wait on for a change to print.
    pub fn next_line(&mut self, silence: Duration, output: std::os::fd::RawFd) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                return Ok(Some(self.buffer.drain(..=end).collect()));
            }
            if self.buffer.len() > sep::MAX_REQUEST_LINE {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
            }
            let mut fds = [
                libc::pollfd { fd: self.fd, events: libc::POLLIN, revents: 0 },
                // No events asked: only errors and hang-ups are reported.
                libc::pollfd { fd: output, events: 0, revents: 0 },
            ];
            let timeout = silence.as_millis().min(i32::MAX as u128) as libc::c_int;
            // SAFETY: a valid array of two pollfds.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if ready < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            if ready == 0 {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the peer went silent"));
            }
            if fds[1].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            if fds[0].revents == 0 {
                continue;
            }
            let mut chunk = [0u8; 4096];
            // SAFETY: reading into a local buffer from a descriptor the
            // caller keeps open.
            let count = unsafe { libc::read(self.fd, chunk.as_mut_ptr().cast(), chunk.len()) };
            match count {
                0 => return Ok(None),
                count if count > 0 => self.buffer.extend_from_slice(&chunk[..count as usize]),
                _ => {
                    let error = io::Error::last_os_error();
                    if error.kind() != io::ErrorKind::Interrupted {
                        return Err(error);
                    }
                }
            }
        }
    }
}
