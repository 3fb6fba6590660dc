//! TLS for NBD, rustls relayed through a socket pair: the client side for NBD sources
//! (`nbds://`, `nbds+unix://`), and the server side for clonebd's own exports
//! (`--nbd-tls-cert`; [`server_config`], [`serve`]). Both the NBD client and server stay
//! TLS-agnostic; the relay is one for both sides.
//!
//! The NBD client negotiates `NBD_OPT_STARTTLS` and then hands its socket over
//! ([`clonebd_nbd::StartTls`]); [`relay`] runs the TLS handshake on it (verifying the
//! server's certificate against the roots of `--source-tls-ca`, or Mozilla's), and returns
//! the client one end of a unix socket pair. Two threads relay between the pair's other end
//! and the TLS connection: one reads the network and writes plaintext, the other reads
//! plaintext and writes the network. The TLS state is shared under one lock, held while
//! records are made and written, so records go out whole and in order. Either side closing
//! shuts the other down, so a broken network connection breaks the NBD connection above it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clonebd_nbd::Socket;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConnection};

/// The socket under the TLS connection, of either family.
#[derive(Debug)]
enum Net {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Net {
    fn try_clone(&self) -> io::Result<Net> {
        Ok(match self {
            Net::Tcp(s) => Net::Tcp(s.try_clone()?),
            Net::Unix(s) => Net::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Net::Tcp(s) => s.shutdown(Shutdown::Both),
            Net::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Net::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Net::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for Net {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Net::Tcp(s) => s.read(buf),
            Net::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Net {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Net::Tcp(s) => s.write(buf),
            Net::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The certificates in the PEM file `path`, at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| clonebd_core::errno::describe(&e))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let ureq::tls::PemItem::Certificate(c) = item.map_err(|e| e.to_string())? {
            certs.push(CertificateDer::from(c.der().to_vec()));
        }
    }
    if certs.is_empty() {
        return Err("no certificate in it".to_string());
    }
    Ok(certs)
}

/// The certificates in the PEM file `path` as trust roots.
fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in certificates(path)? {
        roots
            .add(c)
            .map_err(|e| format!("a certificate in it is not usable: {e}"))?;
    }
    Ok(roots)
}

/// The certificate chain and private key a client shows a server that asks for one
/// (`--source-tls-cert`, `--source-tls-key`), for NBD over TLS and HTTPS alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The certificate chain (PEM), the client's own certificate first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A [`ClientIdentity`] loaded: the chain and the key, in DER.
#[derive(Debug)]
pub struct LoadedIdentity {
    /// The certificates, the client's own first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
}

impl ClientIdentity {
    /// Reads both files; the error names the flag and file.
    pub fn load(&self) -> Result<LoadedIdentity, String> {
        let chain = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("--source-tls-cert {}: {e}", self.cert.display()))?;
        if chain.is_empty() {
            return Err(format!(
                "--source-tls-cert {}: no certificate in it",
                self.cert.display()
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| format!("--source-tls-key {}: {e}", self.key.display()))?;
        Ok(LoadedIdentity { chain, key })
    }
}

/// The client configuration: the certificates in `ca` (PEM) as the roots, or Mozilla's, and
/// the client's own certificate when `identity` gives one.
pub fn config(
    ca: Option<&Path>,
    identity: Option<&ClientIdentity>,
) -> Result<Arc<ClientConfig>, String> {
    let roots = match ca {
        Some(path) => roots(path)?,
        None => {
            let mut roots = RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            roots
        }
    };
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let loaded = id.load()?;
            builder
                .with_client_auth_cert(loaded.chain, loaded.key)
                .map_err(|e| {
                    format!(
                        "--source-tls-key {}: does not go with --source-tls-cert {}: {e}",
                        id.key.display(),
                        id.cert.display()
                    )
                })?
        }
    };
    Ok(Arc::new(config))
}

/// Why the server's TLS configuration cannot be made: the flag, the file, and why.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {}: {why}", .path.display())]
pub struct ServerConfigError {
    /// The flag that named the file (`--nbd-tls-cert`, `--nbd-tls-key`,
    /// `--nbd-tls-client-ca`).
    pub flag: &'static str,
    /// The file.
    pub path: std::path::PathBuf,
    /// What is wrong with it.
    pub why: String,
}

/// The server configuration of clonebd's NBD exports: the certificate chain in `cert` and
/// its private key in `key` (PEM); with `client_ca`, clients must present a certificate that
/// the certificates in it (PEM) sign, else the TLS handshake fails.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, ServerConfigError> {
    let err = |flag: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |why: String| ServerConfigError { flag, path, why }
    };
    let chain = certificates(cert).map_err(err("--nbd-tls-cert", cert))?;
    let private = match std::fs::read(key) {
        Ok(pem) => PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no private key in it".to_string(),
            e => format!("not a PEM private key: {e}"),
        }),
        Err(e) => Err(clonebd_core::errno::describe(&e)),
    }
    .map_err(err("--nbd-tls-key", key))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        Some(ca) => {
            let roots = roots(ca).map_err(err("--nbd-tls-client-ca", ca))?;
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| err("--nbd-tls-client-ca", ca)(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, private)
        .map_err(|e| err("--nbd-tls-key", key)(format!("does not fit the certificate: {e}")))?;
    Ok(Arc::new(config))
}

/// Runs the server's side of the TLS handshake over `socket` (within `timeout`, `None`: no
/// limit) and relays: the returned stream carries the plaintext. For
/// `clonebd_nbd::ServerTls`. Each write to the network must be taken by the client within
/// `send_timeout` (the payload deadline), else the relay ends and closes the connection: a
/// client that stops reading cannot hold the relay thread and its socket.
pub fn serve(
    socket: Socket,
    config: &Arc<rustls::ServerConfig>,
    timeout: Option<Duration>,
    send_timeout: Option<Duration>,
) -> io::Result<UnixStream> {
    let conn = ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
    start(
        socket,
        Connection::Server(conn),
        timeout,
        Side::Server,
        send_timeout,
    )
}

/// Which end of TLS the relay runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the TLS handshake with `host` over `socket` (within `timeout`) and relays: the
/// returned stream carries the plaintext.
pub fn relay(
    socket: Socket,
    config: &Arc<ClientConfig>,
    host: &str,
    timeout: Duration,
) -> io::Result<UnixStream> {
    let name = ServerName::try_from(host.to_string()).map_err(|e| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("TLS name {host}: {e}"))
    })?;
    let conn = ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
    start(
        socket,
        Connection::Client(conn),
        Some(timeout),
        Side::Client,
        None,
    )
}

/// The TLS handshake of `conn` over `socket` (within `timeout`), then the relay threads,
/// whose writes to the network wait at most `send_timeout`.
fn start(
    socket: Socket,
    mut conn: Connection,
    timeout: Option<Duration>,
    side: Side,
    send_timeout: Option<Duration>,
) -> io::Result<UnixStream> {
    let mut net = match socket {
        Socket::Tcp(s) => Net::Tcp(s),
        Socket::Unix(s) => Net::Unix(s),
    };
    net.set_timeouts(timeout)?;
    while conn.is_handshaking() {
        // A failure of TLS itself comes back with its `rustls::Error` inside.
        if let Err(e) = conn.complete_io(&mut net) {
            // The alert that tells the peer why (a certificate refused), if it can go.
            if conn.wants_write() {
                let _ = conn.write_tls(&mut net);
            }
            return Err(e);
        }
    }
    net.set_timeouts(None)?;
    if send_timeout.is_some() {
        match &net {
            Net::Tcp(s) => s.set_write_timeout(send_timeout)?,
            Net::Unix(s) => s.set_write_timeout(send_timeout)?,
        }
    }
    let (mut ours, theirs) = UnixStream::pair()?;
    // The last handshake read may have brought the peer's first data with it (a client's
    // first option right behind its Finished), and the server may owe session tickets:
    // neither may wait for the network to move again.
    let state = conn.process_new_packets().map_err(io::Error::other)?;
    let want = state.plaintext_bytes_to_read();
    if want > 0 {
        let mut early = vec![0u8; want];
        conn.reader().read_exact(&mut early)?;
        ours.write_all(&early)?;
    }
    while conn.wants_write() {
        conn.write_tls(&mut net)?;
    }
    let tls = Arc::new(Mutex::new(conn));
    let (net_in, mut plain_out) = (net.try_clone()?, ours.try_clone()?);
    let tls_in = Arc::clone(&tls);
    std::thread::Builder::new()
        .name("nbd-tls-rx".into())
        .spawn(move || {
            let mut net_in = net_in;
            let ended = network_to_plain(&mut net_in, &tls_in, &mut plain_out);
            if side == Side::Server && ended.is_ok() {
                // The client closed (or the server shuts down): the NBD server sees end of
                // file, and its last replies still go out; it closes the stream when done,
                // which ends the other thread and the socket.
                let _ = plain_out.shutdown(Shutdown::Write);
            } else {
                let _ = plain_out.shutdown(Shutdown::Both);
                net_in.shutdown();
            }
        })?;
    std::thread::Builder::new()
        .name("nbd-tls-tx".into())
        .spawn(move || {
            let (mut net, mut plain_in) = (net, ours);
            let _ = plain_to_network(&mut plain_in, &tls, &mut net);
            let _ = plain_in.shutdown(Shutdown::Both);
            net.shutdown();
        })?;
    Ok(theirs)
}

/// TLS records from the network, their plaintext to the client, until either closes.
fn network_to_plain(
    net: &mut Net,
    tls: &Mutex<Connection>,
    plain: &mut UnixStream,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut clear = Vec::with_capacity(64 * 1024);
    loop {
        let n = net.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        {
            let mut c = lock(tls);
            let mut rd = &buf[..n];
            while !rd.is_empty() {
                c.read_tls(&mut rd)?;
                let state = c.process_new_packets().map_err(io::Error::other)?;
                let want = state.plaintext_bytes_to_read();
                if want > 0 {
                    let at = clear.len();
                    clear.resize(at + want, 0);
                    c.reader().read_exact(&mut clear[at..])?;
                }
                if state.peer_has_closed() {
                    plain.write_all(&clear)?;
                    return Ok(());
                }
            }
            // Key updates and alerts the server may be owed.
            while c.wants_write() {
                c.write_tls(net)?;
            }
        }
        plain.write_all(&clear)?;
        clear.clear();
    }
}

/// Plaintext from the client, as TLS records to the network, until either closes.
fn plain_to_network(
    plain: &mut UnixStream,
    tls: &Mutex<Connection>,
    net: &mut Net,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = plain.read(&mut buf)?;
        let mut c = lock(tls);
        if n == 0 {
            c.send_close_notify();
        } else {
            c.writer().write_all(&buf[..n])?;
        }
        while c.wants_write() {
            c.write_tls(net)?;
        }
        if n == 0 {
            return Ok(());
        }
    }
}
