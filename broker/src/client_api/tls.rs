//! One client port for TLS and plaintext HTTP/2, told apart by the first
//! byte of each connection (a TLS ClientHello starts with 0x16; HTTP/2's
//! preface with 'P'). Java, Go and C# clients default to TLS, Python,
//! Node.js and Rust to plaintext; both reach the same service.
//!
//! Without a configured certificate the broker makes its own at first
//! start: a CA and a server certificate for `localhost`, `127.0.0.1`,
//! `::1` and the advertised host, kept in `<data dir>/tls/` so clients can
//! trust `ca.pem` across restarts.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::coalesce::Coalescing;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
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
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("reading certificate {}: {e}", files.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("reading key {}: {e}", files.key.display()))?;
    let mut cfg = ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("certificate {}: {e}", files.cert.display()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(cfg)), ca))
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
}
