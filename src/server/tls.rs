//! TLS server configuration (rustls) from PEM files.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Loads a certificate chain (PEM, leaf first) and private key (PEM: PKCS#8,
/// PKCS#1 or SEC1) into a rustls server configuration offering TLS 1.3 and,
/// unless `tls13_only`, TLS 1.2.
///
/// Errors name the file and the problem: unreadable, no certificate, no key,
/// or a key that does not match the certificate.
pub fn load(cert: &Path, key: &Path, tls13_only: bool) -> Result<Arc<ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read certificate {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot parse certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{} contains no PEM certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read private key {}: {e}", key.display()))?;
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                format!(
                    "certificate {} and key do not work together: {e}",
                    cert.display()
                )
            })?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_generated_certificate_and_reports_bad_files() {
        let dir = std::env::temp_dir().join(format!("turnserver-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        assert!(load(&cert, &key, false).is_ok());
        assert!(load(&cert, &key, true).is_ok());
        let missing = dir.join("missing.pem");
        assert!(
            load(&missing, &key, false)
                .unwrap_err()
                .contains("missing.pem")
        );
        assert!(
            load(&key, &key, false)
                .unwrap_err()
                .contains("no PEM certificate")
        );
        assert!(
            load(&cert, &cert, false)
                .unwrap_err()
                .contains("private key")
        );
        let other = rcgen::generate_simple_self_signed(vec!["x".to_string()]).unwrap();
        let other_key = dir.join("other.pem");
        std::fs::write(&other_key, other.signing_key.serialize_pem()).unwrap();
        assert!(
            load(&cert, &other_key, false)
                .unwrap_err()
                .contains("do not work together")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
