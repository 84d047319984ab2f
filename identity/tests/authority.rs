//! The CA signs by istiod's rules, keeps its root across restarts, loads Istio's plug-in layout,
//! and refuses bad input with an error that says what is wrong.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    PKCS_ECDSA_P384_SHA384, SanType,
};
use sluice_identity::authority::{CLOCK_SKEW, PLUGIN_FILES};
use sluice_identity::{CaError, CaSource, CertificateAuthority, LeafPolicy, SpiffeId};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A CSR for a fresh key of `alg` that asks for names the CA must ignore.
fn csr(alg: &'static rcgen::SignatureAlgorithm) -> String {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut params = CertificateParams::new(vec!["admin.example".to_string()]).unwrap();
    params.subject_alt_names.push(SanType::URI("spiffe://cluster.local/ns/istio-system/sa/istiod".try_into().unwrap()));
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn der(pem_text: &str) -> Vec<u8> {
    pem::parse(pem_text).unwrap().into_contents()
}

/// The URI SANs and DNS SANs of a certificate.
fn names(cert: &X509Certificate<'_>) -> Vec<String> {
    let san = cert.subject_alternative_name().unwrap().expect("a SAN extension");
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => format!("uri:{u}"),
            GeneralName::DNSName(d) => format!("dns:{d}"),
            other => format!("{other:?}"),
        })
        .collect()
}

fn productpage() -> SpiffeId {
    SpiffeId::new("cluster.local", "default", "bookinfo-productpage")
}

#[test]
fn a_leaf_carries_the_callers_identity_only_and_istiods_usages_and_lifetime() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::self_signed(dir.path(), "cluster.local").unwrap();
    assert_eq!(ca.source(), &CaSource::SelfSigned(dir.path().to_path_buf()));
    let before = time::OffsetDateTime::now_utc();
    let chain = ca.sign(&csr(&PKCS_ECDSA_P256_SHA256), &productpage(), None).unwrap();
    assert_eq!(chain.len(), 2, "leaf, root");
    assert_eq!(chain[1], ca.root_pem());
    let (leaf_der, root_der) = (der(&chain[0]), der(&chain[1]));
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    leaf.verify_signature(Some(root.public_key())).expect("the root signed the leaf");
    assert_eq!(
        names(&leaf),
        ["uri:spiffe://cluster.local/ns/default/sa/bookinfo-productpage"],
        "the CSR's names are ignored"
    );
    assert!(!leaf.is_ca());
    let usage = leaf.key_usage().unwrap().expect("key usage").value;
    assert!(usage.digital_signature() && usage.key_encipherment() && !usage.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().expect("extended key usage").value;
    assert!(eku.server_auth && eku.client_auth);
    let not_before = leaf.validity().not_before.to_datetime();
    let not_after = leaf.validity().not_after.to_datetime();
    let skew = time::Duration::try_from(CLOCK_SKEW).unwrap();
    assert!((before - skew - not_before).abs() < time::Duration::seconds(5), "valid from 2 minutes ago: {not_before}");
    let day = (not_after - before - time::Duration::hours(24)).abs();
    assert!(day < time::Duration::seconds(5), "24 h by default: {not_after}");
    // The root: a CA of the trust domain.
    assert!(root.is_ca());
    let org: Vec<_> = root.subject().iter_organization().map(|o| o.as_str().unwrap().to_string()).collect();
    assert_eq!(org, ["cluster.local"]);

    // A requested TTL is honoured up to the maximum; beyond it the request is refused.
    let hour = ca.sign(&csr(&PKCS_ECDSA_P384_SHA384), &productpage(), Some(Duration::from_secs(3600))).unwrap();
    let hour_der = der(&hour[0]);
    let (_, leaf) = X509Certificate::from_der(&hour_der).unwrap();
    let life = leaf.validity().not_after.to_datetime() - leaf.validity().not_before.to_datetime();
    assert!((life - time::Duration::hours(1) - skew).abs() < time::Duration::seconds(5), "{life}");
    let err = ca.sign(&csr(&PKCS_ECDSA_P256_SHA256), &productpage(), Some(Duration::from_secs(91 * 24 * 3600)));
    assert!(matches!(err, Err(CaError::TtlTooLong { .. })), "{err:?}");
    let short = LeafPolicy { default_ttl: Duration::from_secs(60), max_ttl: Duration::from_secs(600) };
    let ca = ca.with_policy(short);
    assert!(matches!(
        ca.sign(&csr(&PKCS_ECDSA_P256_SHA256), &productpage(), Some(Duration::from_secs(601))),
        Err(CaError::TtlTooLong { .. })
    ));
}

#[test]
fn bad_requests_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::self_signed(dir.path(), "cluster.local").unwrap();
    let refused = |csr: &str| match ca.sign(csr, &productpage(), None) {
        Err(CaError::InvalidCsr(reason)) => reason,
        other => panic!("not refused as invalid: {other:?}"),
    };
    assert!(refused("garbage").contains("not PEM"));
    assert!(refused(ca.root_pem()).contains("CERTIFICATE"), "a certificate is not a request");
    // A request whose signature does not match its content.
    let good = csr(&PKCS_ECDSA_P256_SHA256);
    let mut bytes = der(&good);
    let n = bytes.len();
    bytes[n - 5] ^= 0x55;
    let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", bytes));
    let reason = refused(&tampered);
    assert!(reason.contains("verified") || reason.contains("PKCS#10"), "{reason}");
}

#[test]
fn the_root_survives_a_restart_and_what_it_signed_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let first = CertificateAuthority::self_signed(dir.path(), "cluster.local").unwrap();
    let chain = first.sign(&csr(&PKCS_ECDSA_P256_SHA256), &productpage(), None).unwrap();
    drop(first);
    let again = CertificateAuthority::self_signed(dir.path(), "cluster.local").unwrap();
    assert_eq!(again.root_pem(), chain[1], "the same root");
    let (leaf_der, root_der) = (der(&chain[0]), der(again.root_pem()));
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    leaf.verify_signature(Some(root.public_key())).expect("an old leaf verifies against the reloaded root");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca-key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key is its owner's only: {mode:o}");
    }
}

/// A root, an intermediate it signed, and the intermediate's key, as an operator makes them for
/// Istio's plug-in CA.
fn plug_in_files(dir: &std::path::Path, mismatched_key: bool) {
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut root = CertificateParams::default();
    root.distinguished_name.push(DnType::CommonName, "Root CA");
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_cert = root.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root, root_key);
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "Intermediate CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.signed_by(&ca_key, &root_issuer).unwrap();
    let key = if mismatched_key { KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap() } else { ca_key };
    let [cert, key_file, chain, root_file] = PLUGIN_FILES.map(|f| dir.join(f));
    std::fs::write(cert, ca_cert.pem()).unwrap();
    std::fs::write(key_file, key.serialize_pem()).unwrap();
    std::fs::write(chain, format!("{}{}", ca_cert.pem(), root_cert.pem())).unwrap();
    std::fs::write(root_file, root_cert.pem()).unwrap();
}

#[test]
fn istios_plug_in_layout_signs_through_its_intermediate() {
    let dir = tempfile::tempdir().unwrap();
    plug_in_files(dir.path(), false);
    let ca = CertificateAuthority::plug_in(dir.path()).unwrap();
    let chain = ca.sign(&csr(&PKCS_ECDSA_P256_SHA256), &productpage(), None).unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    assert_eq!(chain[2], ca.root_pem());
    let ders: Vec<Vec<u8>> = chain.iter().map(|c| der(c)).collect();
    let certs: Vec<X509Certificate<'_>> = ders.iter().map(|d| X509Certificate::from_der(d).unwrap().1).collect();
    certs[0].verify_signature(Some(certs[1].public_key())).expect("the intermediate signed the leaf");
    certs[1].verify_signature(Some(certs[2].public_key())).expect("the root signed the intermediate");

    let other = tempfile::tempdir().unwrap();
    plug_in_files(other.path(), true);
    let err = CertificateAuthority::plug_in(other.path()).err().expect("a key of another certificate is refused");
    let said = err.to_string();
    assert!(said.contains("ca-cert.pem") && said.contains("does not belong to the key"), "{said}");
    std::fs::remove_file(other.path().join("root-cert.pem")).unwrap();
    plug_in_files(other.path(), false);
    std::fs::write(other.path().join("root-cert.pem"), "nothing").unwrap();
    let said = CertificateAuthority::plug_in(other.path()).err().unwrap().to_string();
    assert!(said.contains("root-cert.pem"), "{said}");
}
