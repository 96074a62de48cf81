//! Ed25519 signatures of the archive's own records: session manifests, archive log entries and the
//! retention marker. Each carries `public_key` (hex) and `signature` (hex), the signature over the
//! record's JSON with `signature` absent ([`Signed::signed_bytes`]), so a record is checked on its
//! own, and against the key an auditor requires.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::Serialize;

/// A record's signature, checked against its embedded public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureCheck {
    Unsigned,
    Valid,
    Invalid,
}

/// Why a record fails a signature check ([`Signed::signature_problem`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureProblem {
    /// A signature that does not match the record: edited, or forged.
    Invalid,
    /// A key is required and the record is not signed.
    Unsigned,
    /// A key is required and the record is signed by another one.
    OtherKey,
}

impl std::fmt::Display for SignatureProblem {
    /// A verb phrase: "archive log entry 3 {problem}".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SignatureProblem::Invalid => "has an invalid signature",
            SignatureProblem::Unsigned => "is not signed by the required key (it is unsigned)",
            SignatureProblem::OtherKey => "is not signed by the required key (another key signed it)",
        })
    }
}

/// A record carrying its own signature.
pub trait Signed: Serialize + Clone {
    /// The hex public key and hex signature fields.
    fn signature_fields(&self) -> (Option<&str>, Option<&str>);

    /// Set both fields.
    fn set_signature_fields(&mut self, public_key: Option<String>, signature: Option<String>);

    /// The bytes a signature covers: the record's JSON with `signature` cleared (`public_key`
    /// included).
    fn signed_bytes(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        let public_key = self.signature_fields().0.map(str::to_string);
        unsigned.set_signature_fields(public_key, None);
        serde_json::to_vec(&unsigned).expect("a signed record always serializes")
    }

    /// Sign with `key` (sets `public_key` and `signature`).
    fn sign(&mut self, key: &SigningKey) {
        let public_key = hex::encode(key.verifying_key().as_bytes());
        self.set_signature_fields(Some(public_key.clone()), None);
        let sig = key.sign(&self.signed_bytes());
        self.set_signature_fields(Some(public_key), Some(hex::encode(sig.to_bytes())));
    }

    /// Check the signature against the embedded public key.
    fn check_signature(&self) -> SignatureCheck {
        let (Some(key), Some(sig)) = self.signature_fields() else {
            return SignatureCheck::Unsigned;
        };
        let key = hex::decode(key).ok().and_then(|k| <[u8; 32]>::try_from(k).ok());
        let sig = hex::decode(sig).ok().and_then(|s| <[u8; 64]>::try_from(s).ok());
        let (Some(key), Some(sig)) = (key, sig) else { return SignatureCheck::Invalid };
        let Ok(key) = VerifyingKey::from_bytes(&key) else { return SignatureCheck::Invalid };
        match key.verify(&self.signed_bytes(), &Signature::from_bytes(&sig)) {
            Ok(()) => SignatureCheck::Valid,
            Err(_) => SignatureCheck::Invalid,
        }
    }

    /// The record carries a valid signature by `key`.
    fn is_signed_by(&self, key: &VerifyingKey) -> bool {
        self.signature_fields().0 == Some(hex::encode(key.as_bytes()).as_str())
            && self.check_signature() == SignatureCheck::Valid
    }

    /// What is wrong with the signature, `required` (if any) being the key that must have made it:
    /// an invalid signature always counts; an unsigned record only when a key is required.
    fn signature_problem(&self, required: Option<&VerifyingKey>) -> Option<SignatureProblem> {
        match self.check_signature() {
            SignatureCheck::Invalid => Some(SignatureProblem::Invalid),
            SignatureCheck::Unsigned => required.map(|_| SignatureProblem::Unsigned),
            SignatureCheck::Valid => {
                required.filter(|key| !self.is_signed_by(key)).map(|_| SignatureProblem::OtherKey)
            }
        }
    }
}

/// Parse a signing key: 64 hex digits (the Ed25519 seed), surrounding whitespace ignored.
pub fn parse_signing_key(text: &str) -> Option<SigningKey> {
    let seed: [u8; 32] = hex::decode(text.trim()).ok()?.try_into().ok()?;
    Some(SigningKey::from_bytes(&seed))
}

/// Parse a public key: 64 hex digits.
pub fn parse_public_key(text: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(text.trim()).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}
