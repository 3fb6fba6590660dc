//! TLS for NBD sources (`nbds://`, `nbds+unix://`): rustls, relayed through a socket pair.
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
use rustls::{ClientConfig, ClientConnection, RootCertStore};

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
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| clonebd_core::errno::describe(&e))?;
            let mut n = 0;
            for item in ureq::tls::parse_pem(&pem) {
                if let ureq::tls::PemItem::Certificate(c) = item.map_err(|e| e.to_string())? {
                    roots
                        .add(c.der().to_vec().into())
                        .map_err(|e| format!("a certificate in it is not usable: {e}"))?;
                    n += 1;
                }
            }
            if n == 0 {
                return Err("no certificate in it".to_string());
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
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
    let mut net = match socket {
        Socket::Tcp(s) => Net::Tcp(s),
        Socket::Unix(s) => Net::Unix(s),
    };
    let mut conn = ClientConnection::new(Arc::clone(config), name).map_err(io::Error::other)?;
    net.set_timeouts(Some(timeout))?;
    while conn.is_handshaking() {
        // A failure of TLS itself comes back with its `rustls::Error` inside.
        conn.complete_io(&mut net)?;
    }
    net.set_timeouts(None)?;
    let (ours, theirs) = UnixStream::pair()?;
    let tls = Arc::new(Mutex::new(conn));
    let (net_in, mut plain_out) = (net.try_clone()?, ours.try_clone()?);
    let tls_in = Arc::clone(&tls);
    std::thread::Builder::new()
        .name("nbd-tls-rx".into())
        .spawn(move || {
            let mut net_in = net_in;
            let _ = network_to_plain(&mut net_in, &tls_in, &mut plain_out);
            let _ = plain_out.shutdown(Shutdown::Both);
            net_in.shutdown();
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
    tls: &Mutex<ClientConnection>,
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
    tls: &Mutex<ClientConnection>,
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
