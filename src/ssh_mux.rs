//! The control socket of a shared ssh connection, spoken to directly.
//!
//! `ssh -O forward|cancel|check` is a whole ssh process (it reads its
//! configuration, connects to the master, says one thing and exits):
//! several milliseconds each, and a `dcat ssh://` makes three, an import
//! one per service. The master's side of that exchange is OpenSSH's
//! multiplexing protocol (PROTOCOL.mux, version 4), which these few
//! requests need only a little of: a hello each way, then one request and
//! its reply, each a packet of a 32-bit big-endian length and a body of
//! 32-bit numbers and length-prefixed strings.
//!
//! ssh still starts the master, authenticates and encrypts; this only asks
//! a running master, over its socket in the user's private scope, to listen
//! or stop listening, or whether it is alive. A socket where no master
//! answers is [`MuxError::Unreachable`], and the caller asks `ssh -O`
//! instead, which says what it makes of it.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;

const VERSION: u32 = 4;
const MSG_HELLO: u32 = 0x0000_0001;
const C_ALIVE_CHECK: u32 = 0x1000_0004;
const C_OPEN_FWD: u32 = 0x1000_0006;
const C_CLOSE_FWD: u32 = 0x1000_0007;
const S_OK: u32 = 0x8000_0001;
const S_PERMISSION_DENIED: u32 = 0x8000_0002;
const S_FAILURE: u32 = 0x8000_0003;
const S_ALIVE: u32 = 0x8000_0005;
/// A local forward (`-L`).
const FWD_LOCAL: u32 = 1;
/// The port that says "the address is a socket path" (-2).
const PORT_STREAMLOCAL: u32 = 0xffff_fffe;
/// Far more than any reply to these requests; a longer one is not a master.
const MAX_PACKET: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum MuxError {
    /// Nothing answers as a master there (no socket, nobody listening,
    /// not a master, gone mid-exchange).
    #[error("no ssh master answers at {path}: {detail}")]
    Unreachable { path: String, detail: String },
    /// The master refused the request, with its reason.
    #[error("{0}")]
    Refused(String),
}

/// A forward in both directions' terms: where the master listens, and the
/// remote socket it connects each connection to.
pub type Forward<'a> = (&'a Path, &'a str);

/// One conversation with a master.
pub struct Master {
    stream: UnixStream,
    path: String,
    next_request: u32,
}

impl Master {
    /// Connects and exchanges hellos; every read and write is bounded by
    /// `timeout`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Master, MuxError> {
        let path = socket.display().to_string();
        let unreachable = |error: io::Error| MuxError::Unreachable { path: path.clone(), detail: error.to_string() };
        let stream = crate::net::unix_connect(socket).map_err(unreachable)?;
        stream.set_read_timeout(Some(timeout)).map_err(unreachable)?;
        stream.set_write_timeout(Some(timeout)).map_err(unreachable)?;
        let mut master = Master { stream, path, next_request: 1 };
        let mut hello = Vec::with_capacity(8);
        put_u32(&mut hello, MSG_HELLO);
        put_u32(&mut hello, VERSION);
        master.send(&hello)?;
        let reply = master.receive()?;
        let mut fields = Fields(&reply);
        match (fields.u32(), fields.u32()) {
            // Extensions may follow; none is asked for.
            (Some(MSG_HELLO), Some(VERSION)) => Ok(master),
            (Some(MSG_HELLO), Some(other)) => {
                Err(master.unreachable(format!("protocol version {other}, not {VERSION}")))
            }
            _ => Err(master.unreachable("no hello".into())),
        }
    }

    /// Whether the master still stands; its process id.
    pub fn alive(&mut self) -> Result<u32, MuxError> {
        let reply = self.request(C_ALIVE_CHECK, &[])?;
        let mut fields = Fields(&reply);
        match fields.u32() {
            Some(S_ALIVE) if fields.u32() == Some(self.next_request - 1) => {
                fields.u32().ok_or_else(|| self.unreachable("a short alive reply".into()))
            }
            other => Err(self.unexpected(other, fields)),
        }
    }

    /// `ssh -O forward -L listen:remote`: the master listens at `listen`.
    /// A forward it already has is granted again.
    pub fn open_forward(&mut self, forward: Forward) -> Result<(), MuxError> {
        self.forward_request(C_OPEN_FWD, forward)
    }

    /// `ssh -O cancel -L listen:remote`: the master stops listening there;
    /// connections it carries go on.
    pub fn close_forward(&mut self, forward: Forward) -> Result<(), MuxError> {
        self.forward_request(C_CLOSE_FWD, forward)
    }

    fn forward_request(&mut self, kind: u32, (listen, remote): Forward) -> Result<(), MuxError> {
        let mut body = Vec::with_capacity(64 + listen.as_os_str().len() + remote.len());
        put_u32(&mut body, FWD_LOCAL);
        put_string(&mut body, std::os::unix::ffi::OsStrExt::as_bytes(listen.as_os_str()));
        put_u32(&mut body, PORT_STREAMLOCAL);
        put_string(&mut body, remote.as_bytes());
        put_u32(&mut body, PORT_STREAMLOCAL);
        let reply = self.request(kind, &body)?;
        let mut fields = Fields(&reply);
        match fields.u32() {
            Some(S_OK) if fields.u32() == Some(self.next_request - 1) => Ok(()),
            other => Err(self.unexpected(other, fields)),
        }
    }

    /// Sends request `kind` with the next request id and `body`; the
    /// reply.
    fn request(&mut self, kind: u32, body: &[u8]) -> Result<Vec<u8>, MuxError> {
        let mut packet = Vec::with_capacity(8 + body.len());
        put_u32(&mut packet, kind);
        put_u32(&mut packet, self.next_request);
        packet.extend_from_slice(body);
        self.next_request += 1;
        self.send(&packet)?;
        self.receive()
    }

    /// A refusal, with the master's reason; anything else means this is
    /// not a master we understand.
    fn unexpected(&self, kind: Option<u32>, mut fields: Fields) -> MuxError {
        match kind {
            Some(S_FAILURE | S_PERMISSION_DENIED) => {
                let _request = fields.u32();
                let reason = fields.string().map(|reason| String::from_utf8_lossy(reason).into_owned());
                MuxError::Refused(reason.unwrap_or_else(|| "refused".into()))
            }
            Some(kind) => self.unreachable(format!("an unexpected reply ({kind:#x})")),
            None => self.unreachable("an empty reply".into()),
        }
    }

    fn unreachable(&self, detail: String) -> MuxError {
        MuxError::Unreachable { path: self.path.clone(), detail }
    }

    fn send(&mut self, body: &[u8]) -> Result<(), MuxError> {
        let mut packet = Vec::with_capacity(4 + body.len());
        put_u32(&mut packet, body.len() as u32);
        packet.extend_from_slice(body);
        self.stream.write_all(&packet).map_err(|error| self.unreachable(error.to_string()))
    }

    fn receive(&mut self) -> Result<Vec<u8>, MuxError> {
        let mut length = [0u8; 4];
        self.stream.read_exact(&mut length).map_err(|error| self.unreachable(error.to_string()))?;
        let length = u32::from_be_bytes(length) as usize;
        if length > MAX_PACKET {
            return Err(self.unreachable(format!("a packet of {length} bytes")));
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).map_err(|error| self.unreachable(error.to_string()))?;
        Ok(body)
    }
}

fn put_u32(buffer: &mut Vec<u8>, value: u32) {
    buffer.extend_from_slice(&value.to_be_bytes());
}

fn put_string(buffer: &mut Vec<u8>, value: &[u8]) {
    put_u32(buffer, value.len() as u32);
    buffer.extend_from_slice(value);
}

/// A reader of a packet's fields, in order.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*head))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let length = self.u32()? as usize;
        let value = self.0.get(..length)?;
        self.0 = &self.0[length..];
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    type Reply = Box<dyn Fn(&[u8]) -> Vec<u8> + Send>;

    /// A master that answers its hello with `hello` and then each request
    /// with the next of `replies` (a closure of the request's body), and
    /// hands back what it was sent.
    fn fake_master(hello: Vec<u8>, replies: Vec<Reply>) -> (tempdir::Dir, std::thread::JoinHandle<Vec<Vec<u8>>>) {
        let dir = tempdir::Dir::new();
        let listener = UnixListener::bind(dir.0.join("master")).unwrap();
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            fn read_packet(stream: &mut UnixStream) -> Option<Vec<u8>> {
                let mut length = [0u8; 4];
                stream.read_exact(&mut length).ok()?;
                let mut body = vec![0; u32::from_be_bytes(length) as usize];
                stream.read_exact(&mut body).ok()?;
                Some(body)
            }
            let mut received = vec![read_packet(&mut stream).unwrap()];
            let mut replies = replies.into_iter();
            let mut out = Vec::new();
            put_string(&mut out, &hello);
            loop {
                stream.write_all(&out).unwrap();
                let Some(request) = read_packet(&mut stream) else { break };
                let Some(reply) = replies.next() else { break };
                out.clear();
                put_string(&mut out, &reply(&request));
                received.push(request);
            }
            received
        });
        (dir, handle)
    }

    fn fields(values: &[u32], text: Option<&str>) -> Vec<u8> {
        let mut body = Vec::new();
        values.iter().for_each(|&value| put_u32(&mut body, value));
        if let Some(text) = text {
            put_string(&mut body, text.as_bytes());
        }
        body
    }

    /// The request id of a request body.
    fn request_id(request: &[u8]) -> u32 {
        u32::from_be_bytes(request[4..8].try_into().unwrap())
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "dipus-mux-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(5);

    #[test]
    fn forwards_and_checks_are_the_requests_ssh_o_sends() {
        let (dir, master) = fake_master(
            fields(&[MSG_HELLO, VERSION], Some("ext")),
            vec![
                Box::new(|request| fields(&[S_OK, request_id(request)], None)),
                Box::new(|request| fields(&[S_OK, request_id(request)], None)),
                Box::new(|request| fields(&[S_ALIVE, request_id(request), 4242], None)),
            ],
        );
        let mut client = Master::connect(&dir.0.join("master"), TIMEOUT).unwrap();
        let forward = (Path::new("/tmp/here.sock"), "/there/it.sock");
        client.open_forward(forward).unwrap();
        client.close_forward(forward).unwrap();
        assert_eq!(client.alive().unwrap(), 4242);
        drop(client);
        let received = master.join().unwrap();
        assert_eq!(received[0], fields(&[MSG_HELLO, VERSION], None));
        let mut body = fields(&[FWD_LOCAL], Some("/tmp/here.sock"));
        body.extend(fields(&[PORT_STREAMLOCAL], Some("/there/it.sock")));
        body.extend(fields(&[PORT_STREAMLOCAL], None));
        let with_header = |kind: u32, id: u32| [fields(&[kind, id], None), body.clone()].concat();
        assert_eq!(received[1], with_header(C_OPEN_FWD, 1));
        assert_eq!(received[2], with_header(C_CLOSE_FWD, 2));
        assert_eq!(received[3], fields(&[C_ALIVE_CHECK, 3], None));
    }

    #[test]
    fn a_refusal_carries_the_masters_reason() {
        let (dir, master) = fake_master(
            fields(&[MSG_HELLO, VERSION], None),
            vec![Box::new(|request| fields(&[S_FAILURE, request_id(request)], Some("Port forwarding failed")))],
        );
        let mut client = Master::connect(&dir.0.join("master"), TIMEOUT).unwrap();
        let error = client.open_forward((Path::new("/a"), "/b")).unwrap_err();
        assert!(matches!(&error, MuxError::Refused(reason) if reason == "Port forwarding failed"), "{error:?}");
        drop(client);
        master.join().unwrap();
    }

    #[test]
    fn what_is_not_a_master_we_understand_is_unreachable() {
        let unreachable = |result: Result<(), MuxError>| matches!(result, Err(MuxError::Unreachable { .. }));
        // Another protocol version.
        let (dir, master) = fake_master(fields(&[MSG_HELLO, 3], None), vec![]);
        assert!(unreachable(Master::connect(&dir.0.join("master"), TIMEOUT).map(drop)));
        master.join().unwrap();
        // A reply to another request, and one of another kind.
        for reply in [fields(&[S_OK, 99], None), fields(&[0x8000_0006, 1], None)] {
            let (dir, master) =
                fake_master(fields(&[MSG_HELLO, VERSION], None), vec![Box::new(move |_: &[u8]| reply.clone())]);
            let mut client = Master::connect(&dir.0.join("master"), TIMEOUT).unwrap();
            assert!(unreachable(client.open_forward((Path::new("/a"), "/b"))));
            drop(client);
            master.join().unwrap();
        }
        // Nobody there.
        let dir = tempdir::Dir::new();
        assert!(unreachable(Master::connect(&dir.0.join("nothing"), TIMEOUT).map(drop)));
    }
}
