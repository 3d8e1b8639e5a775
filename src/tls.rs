//! `--tls-cert`/`--tls-key`: the rustls server configuration for HTTPS and HTTP/2.

use crate::config::Config;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::path::Path;
use std::sync::Arc;

/// `None` without TLS flags. actix adds the ALPN protocols itself (h2, then http/1.1), so HTTP/2
/// clients get HTTP/2 and everyone else HTTP/1.1 on the same port.
pub fn server_config(config: &Config) -> io::Result<Option<rustls::ServerConfig>> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| invalid(cert, "a PEM certificate chain", e))?;
    if certs.is_empty() {
        return Err(invalid(cert, "a PEM certificate chain", "no certificate"));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| invalid(key, "a PEM private key", e))?;
    // ring, chosen explicitly: the process never depends on which provider happens to be
    // installed as the default.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("--tls-cert and --tls-key do not make a usable pair: {e}"),
            )
        })?;
    Ok(Some(server))
}

fn invalid(path: &Path, what: &str, error: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{} does not hold {what}: {error}", path.display()),
    )
}
