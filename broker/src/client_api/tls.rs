//! One client port for TLS and plaintext HTTP/2, told apart by the first
//! byte of each connection (a TLS ClientHello starts with 0x16; HTTP/2's
//! preface with 'P'). Java, Go and C# clients default to TLS, Python,
//! Node.js and Rust to plaintext; both reach the same service.
//!
//! Without a configured certificate the broker makes its own at first
//! start: a CA and a server certificate for `localhost`, `127.0.0.1`,
//! `::1` and the advertised host, kept in `<data dir>/tls/` so clients can
//! trust `ca.pem` across restarts. A configured certificate is read again
//! when its files change (see [`ReloadingCert`]).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use crate::coalesce::Coalescing;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Where the certificate and key come from.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Loads the configured certificate, or makes (once) and loads the
/// broker's own under `dir`. Returns the acceptor and the CA file clients
/// should trust (for a generated certificate).
pub fn acceptor(
    configured: Option<&TlsFiles>,
    dir: &Path,
    host: &str,
) -> Result<(TlsAcceptor, Option<PathBuf>), String> {
    let (files, ca) = match configured {
        Some(f) => (f.clone(), None),
        None => {
            let files = TlsFiles {
                cert: dir.join("server.pem"),
                key: dir.join("server.key"),
            };
            let ca = dir.join("ca.pem");
            if !files.cert.exists() || !files.key.exists() || !ca.exists() {
                generate(dir, host)?;
            }
            (files, Some(ca))
        }
    };
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let resolver = ReloadingCert::open(files, provider.clone(), CERT_RECHECK)?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(cfg)), ca))
}

/// How often, at most, a handshake looks whether the certificate files
/// changed (see [`ReloadingCert`]).
const CERT_RECHECK: Duration = Duration::from_secs(10);

/// What identifies a file's content without reading it: a replaced file
/// (a renewed Kubernetes Secret is a new file behind the same path) has
/// another inode, a rewritten one another length or modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    inode: u64,
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        inode: m.ino(),
        len: m.len(),
        modified: m.modified().ok(),
    })
}

/// The served certificate, read again from its files when they change, so
/// a renewed certificate (cert-manager, a re-created Secret, a replaced
/// file) is served without a restart: a handshake looks at the files' stamps
/// at most every `recheck`, and loads them when either changed. A pair that
/// does not load (half written, a key that does not match) is logged and
/// the previous certificate stays in service until the files change again.
#[derive(Debug)]
struct ReloadingCert {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    recheck: Duration,
    state: parking_lot::Mutex<Served>,
}

#[derive(Debug)]
struct Served {
    key: Arc<CertifiedKey>,
    stamps: [Option<FileStamp>; 2],
    checked: Instant,
}

impl ReloadingCert {
    /// Loads the files; an error if they do not hold a usable pair.
    fn open(
        files: TlsFiles,
        provider: Arc<CryptoProvider>,
        recheck: Duration,
    ) -> Result<Self, String> {
        let stamps = [stamp(&files.cert), stamp(&files.key)];
        let key = load_pair(&files, &provider)?;
        Ok(Self {
            files,
            provider,
            recheck,
            state: parking_lot::Mutex::new(Served {
                key,
                stamps,
                checked: Instant::now(),
            }),
        })
    }

    /// The certificate to serve now, loaded again first if its files changed.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut s = self.state.lock();
        if s.checked.elapsed() >= self.recheck {
            s.checked = Instant::now();
            let stamps = [stamp(&self.files.cert), stamp(&self.files.key)];
            if stamps != s.stamps {
                // Tried once per change: a bad pair is not read again on
                // every handshake.
                s.stamps = stamps;
                match load_pair(&self.files, &self.provider) {
                    Ok(key) => {
                        s.key = key;
                        tracing::info!(cert = %self.files.cert.display(), "the client port's certificate changed on disk and is now served");
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "the client port's certificate files changed but do not load; still serving the previous certificate"
                    ),
                }
            }
        }
        s.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// Reads a certificate chain and its private key, and checks they match.
fn load_pair(files: &TlsFiles, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("reading certificate {}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", files.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("reading key {}: {e}", files.key.display()))?;
    CertifiedKey::from_der(certs, key, provider)
        .map(Arc::new)
        .map_err(|e| {
            format!(
                "certificate {} with key {}: {e}",
                files.cert.display(),
                files.key.display()
            )
        })
}

fn generate(dir: &Path, host: &str) -> Result<(), String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let ca_key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "KeelMQ broker CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).map_err(|e| e.to_string())?;
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if !names.iter().any(|n| n == host) {
        names.push(host.to_owned());
    }
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::new(names).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "KeelMQ broker");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
    let write = |name: &str, text: String| {
        crate::store::persist_atomically(&dir.join(name), text.as_bytes())
            .map_err(|e| format!("writing {name}: {e}"))
    };
    write("ca.pem", ca.pem())?;
    write("server.key", key.serialize_pem())?;
    write("server.pem", cert.pem())?;
    tracing::info!(dir = %dir.display(), "generated a self-signed CA and server certificate for the client port");
    Ok(())
}

/// A client connection, plaintext or TLS.
pub enum ClientIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connected for ClientIo {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            ClientIo::Plain(s) => s.connect_info(),
            ClientIo::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        // HTTP/2 sends a large DATA payload as its own buffer after the frame
        // head: vectored, both go out in one system call.
        match self {
            ClientIo::Plain(s) => s.is_write_vectored(),
            ClientIo::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl<S: Connected> Connected for Coalescing<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> S::ConnectInfo {
        self.get_ref().connect_info()
    }
}

/// TCP keepalive of client connections: the first probe after this many
/// seconds of silence, then one every `TCP_KEEPALIVE_INTERVAL_S`, the
/// connection closed after `TCP_KEEPALIVE_PROBES` unanswered ones. (HTTP/2
/// pings, see [`super::HTTP2_KEEPALIVE_INTERVAL`], usually notice a dead
/// peer first; this also covers a connection the HTTP/2 layer leaves idle.)
const TCP_KEEPALIVE_IDLE_S: libc::c_int = 60;
const TCP_KEEPALIVE_INTERVAL_S: libc::c_int = 10;
const TCP_KEEPALIVE_PROBES: libc::c_int = 3;

/// Turns on TCP keepalive for an accepted connection.
fn keepalive(stream: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, TCP_KEEPALIVE_IDLE_S),
        (
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            TCP_KEEPALIVE_INTERVAL_S,
        ),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, TCP_KEEPALIVE_PROBES),
    ] {
        // SAFETY: `fd` is the open socket `stream` owns for the whole call;
        // the option value is a c_int that lives across it, passed with its size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Accepts connections and yields each once its kind is known and (for
/// TLS) its handshake is done. A slow or broken handshake delays nobody
/// else; it is dropped after 10 s. Writes to each connection are coalesced
/// (see [`Coalescing`]).
pub fn incoming(
    listener: TcpListener,
    tls: TlsAcceptor,
) -> impl Stream<Item = std::io::Result<Coalescing<ClientIo>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Coalescing<ClientIo>>>(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a client connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            if let Err(e) = keepalive(&stream) {
                tracing::debug!(%peer, error = %e, "TCP keepalive could not be set");
            }
            if tx.is_closed() {
                break;
            }
            let (tx, tls) = (tx.clone(), tls.clone());
            tokio::spawn(async move {
                let classify = async {
                    let mut first = [0u8; 1];
                    stream.peek(&mut first).await?;
                    if first[0] == 0x16 {
                        let s = tls.accept(stream).await?;
                        Ok::<_, std::io::Error>(ClientIo::Tls(Box::new(s)))
                    } else {
                        Ok(ClientIo::Plain(stream))
                    }
                };
                match tokio::time::timeout(std::time::Duration::from_secs(10), classify).await {
                    Ok(Ok(io)) => {
                        let _ = tx.send(Ok(Coalescing::new(io))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "client connection dropped before HTTP/2")
                    }
                    Err(_) => tracing::debug!(%peer, "client connection sent nothing for 10 s"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;

    fn sockopt(stream: &TcpStream, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: an open socket, and a c_int-sized buffer with its length.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                level,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt");
        value
    }

    #[tokio::test]
    async fn accepted_connections_have_tcp_keepalive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tls, _) = acceptor(None, dir.path(), "127.0.0.1").expect("acceptor");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut accepted = Box::pin(incoming(listener, tls));
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(b"PRI").await.expect("write");
        let conn = accepted
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        let ClientIo::Plain(s) = conn.get_ref() else {
            panic!("plaintext");
        };
        assert_eq!(sockopt(s, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(
            sockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
            TCP_KEEPALIVE_IDLE_S
        );
        assert_eq!(
            sockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
            TCP_KEEPALIVE_INTERVAL_S
        );
        assert_eq!(
            sockopt(s, libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
            TCP_KEEPALIVE_PROBES
        );
    }

    fn der_of(pem: &Path) -> Vec<u8> {
        CertificateDer::pem_file_iter(pem)
            .expect("pem")
            .next()
            .expect("a certificate")
            .expect("parsed")
            .to_vec()
    }

    /// Puts `cert` and `key` at the served paths as a Secret update does:
    /// new files renamed over the old ones.
    fn install(cert: &Path, key: &Path, files: &TlsFiles) {
        for (from, to) in [(cert, &files.cert), (key, &files.key)] {
            let tmp = to.with_extension("new");
            std::fs::copy(from, &tmp).expect("copy");
            std::fs::rename(&tmp, to).expect("rename");
        }
    }

    /// Two generated certificate pairs (in `a/` and `b/`) and the served
    /// files, holding pair `a`.
    fn two_pairs_serving_the_first() -> (tempfile::TempDir, PathBuf, PathBuf, TlsFiles) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        generate(&a, "broker-0.example").expect("a");
        generate(&b, "broker-0.example").expect("b");
        let live = dir.path().join("live");
        std::fs::create_dir_all(&live).expect("mkdir");
        let files = TlsFiles {
            cert: live.join("tls.crt"),
            key: live.join("tls.key"),
        };
        install(&a.join("server.pem"), &a.join("server.key"), &files);
        (dir, a, b, files)
    }

    #[test]
    fn a_changed_certificate_is_served_and_a_bad_pair_keeps_the_last_good_one() {
        let (_dir, a, b, files) = two_pairs_serving_the_first();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let served =
            ReloadingCert::open(files.clone(), provider.clone(), Duration::ZERO).expect("loads");
        let cert_now = || served.current().cert[0].to_vec();
        assert_eq!(cert_now(), der_of(&a.join("server.pem")));

        // Renewed: the new pair is served from the next handshake on.
        install(&b.join("server.pem"), &b.join("server.key"), &files);
        assert_eq!(cert_now(), der_of(&b.join("server.pem")));

        // A certificate with another's key, or a truncated file, does not
        // load: the last good pair stays in service.
        install(&a.join("server.pem"), &b.join("server.key"), &files);
        assert_eq!(cert_now(), der_of(&b.join("server.pem")));
        std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\nMII").expect("write");
        assert_eq!(cert_now(), der_of(&b.join("server.pem")));

        // Fixed again: served.
        install(&a.join("server.pem"), &a.join("server.key"), &files);
        assert_eq!(cert_now(), der_of(&a.join("server.pem")));

        // Files that never held a usable pair refuse the start.
        let bad = TlsFiles {
            cert: a.join("server.pem"),
            key: b.join("server.key"),
        };
        assert!(ReloadingCert::open(bad, provider, Duration::ZERO).is_err());
    }

    #[test]
    fn the_certificate_files_are_not_looked_at_more_often_than_the_recheck_period() {
        let (_dir, a, b, files) = two_pairs_serving_the_first();
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let served =
            ReloadingCert::open(files.clone(), provider, Duration::from_secs(3600)).expect("loads");
        install(&b.join("server.pem"), &b.join("server.key"), &files);
        assert_eq!(
            served.current().cert[0].to_vec(),
            der_of(&a.join("server.pem"))
        );
    }
}
