//! SASL for the proxy's own connections to brokers (`upstream.sasl`): its metadata refresh and topic-id
//! lookups authenticate with credentials from the config, as a client would, so the proxy works in front
//! of a cluster whose every listener needs SASL. Clients' own SASL exchanges are not this: they pass
//! through untouched.
//!
//! PLAIN (RFC 4616) and SCRAM-SHA-256/512 (RFC 5802, 7677; Kafka's KIP-84), over SaslHandshake v1 and
//! SaslAuthenticate v1. SCRAM never sends the password, checks the broker's final signature (a broker
//! that does not know the password cannot pass as one), and bounds what a broker may make it do: at most
//! [`MAX_ITERATIONS`] PBKDF2 rounds (Kafka's own maximum) and messages of at most 1 KiB.
//!
//! The password is read from a file (not the config, which is often shared or logged) and re-read when
//! the file changes, like certificates (`credential_reloads_total{source="upstream.sasl"}`).

use crate::tls::live::Live;
use crate::tls::TlsProblem;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::{digest, hmac, pbkdf2};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    ScramSha256,
    ScramSha512,
}

impl Mechanism {
    pub fn parse(name: &str) -> Option<Mechanism> {
        match name {
            "PLAIN" => Some(Mechanism::Plain),
            "SCRAM-SHA-256" => Some(Mechanism::ScramSha256),
            "SCRAM-SHA-512" => Some(Mechanism::ScramSha512),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::ScramSha256 => "SCRAM-SHA-256",
            Mechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// `upstream.sasl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSasl {
    pub mechanism: Mechanism,
    pub username: String,
    pub password_file: PathBuf,
}

/// The credentials in force (the password as last read from its file).
pub struct Credentials {
    pub mechanism: Mechanism,
    pub username: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    #[doc(hidden)]
    pub fn for_fuzzing(mechanism: Mechanism) -> Credentials {
        Credentials {
            mechanism,
            username: "fuzz".into(),
            password: "fuzz".into(),
        }
    }
}

const MAX_PASSWORD_BYTES: u64 = 4096;

/// The password in `path`: a regular file of at most 4 KiB; one final line break is not part of it.
pub fn read_password(path: &Path) -> Result<String, String> {
    let at = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let bytes =
        crate::config::reader::read_bounded(path, MAX_PASSWORD_BYTES).map_err(|e| at(&e))?;
    let text = String::from_utf8(bytes).map_err(|_| at(&"not UTF-8 text"))?;
    let password = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(at(&"empty"));
    }
    Ok(password.to_string())
}

/// The credentials as a reloadable setting (a broken new password file is refused, the old one stays).
pub fn live(settings: &UpstreamSasl) -> anyhow::Result<Arc<Live<Credentials>>> {
    let s = settings.clone();
    let build = move || {
        read_password(&s.password_file)
            .map(|password| {
                Arc::new(Credentials {
                    mechanism: s.mechanism,
                    username: s.username.clone(),
                    password,
                })
            })
            .map_err(|message| {
                vec![TlsProblem {
                    key: "password_file",
                    message,
                }]
            })
    };
    Live::new("upstream.sasl", vec![settings.password_file.clone()], build)
        .map(Arc::new)
        .map_err(|p| anyhow::anyhow!("upstream.sasl.password_file: {}", p[0].message))
}

/// The most PBKDF2 rounds a broker may ask for (Kafka's ScramMechanism allows 4096 to 16384).
pub const MAX_ITERATIONS: u32 = 16_384;
/// The longest SCRAM message accepted from a broker.
const MAX_MESSAGE: usize = 1024;

/// A SASL exchange from the client's side: the first message, then an answer to each challenge, until
/// done.
pub enum Exchange {
    Plain,
    Scram(Scram),
}

impl Exchange {
    /// The exchange for `creds`, with `nonce` (random, printable, no comma) for SCRAM.
    pub fn start(creds: &Credentials, nonce: &str) -> (Exchange, Vec<u8>) {
        match creds.mechanism {
            Mechanism::Plain => {
                let mut first = Vec::new();
                first.push(0);
                first.extend_from_slice(creds.username.as_bytes());
                first.push(0);
                first.extend_from_slice(creds.password.as_bytes());
                (Exchange::Plain, first)
            }
            Mechanism::ScramSha256 | Mechanism::ScramSha512 => {
                let (scram, first) = Scram::start(creds, nonce);
                (Exchange::Scram(scram), first)
            }
        }
    }
}

/// A SCRAM exchange in progress.
pub struct Scram {
    sha512: bool,
    password: String,
    client_nonce: String,
    client_first_bare: String,
    /// Set once the client-final message is sent: the signature the broker must answer with.
    server_signature: Option<Vec<u8>>,
}

fn saslname(name: &str) -> String {
    name.replace('=', "=3D").replace(',', "=2C")
}

fn attribute(message: &str, key: char) -> Option<&str> {
    message
        .split(',')
        .find_map(|part| part.strip_prefix(key)?.strip_prefix('='))
}

impl Scram {
    fn start(creds: &Credentials, nonce: &str) -> (Scram, Vec<u8>) {
        let bare = format!("n={},r={nonce}", saslname(&creds.username));
        let first = format!("n,,{bare}").into_bytes();
        (
            Scram {
                sha512: creds.mechanism == Mechanism::ScramSha512,
                password: creds.password.clone(),
                client_nonce: nonce.to_string(),
                client_first_bare: bare,
                server_signature: None,
            },
            first,
        )
    }

    fn hmac(&self, key: &[u8], data: &[u8]) -> Vec<u8> {
        let alg = if self.sha512 {
            hmac::HMAC_SHA512
        } else {
            hmac::HMAC_SHA256
        };
        hmac::sign(&hmac::Key::new(alg, key), data)
            .as_ref()
            .to_vec()
    }

    fn hash(&self, data: &[u8]) -> Vec<u8> {
        let alg = if self.sha512 {
            &digest::SHA512
        } else {
            &digest::SHA256
        };
        digest::digest(alg, data).as_ref().to_vec()
    }

    /// The client-final message for the broker's server-first message.
    pub fn answer(&mut self, server_first: &[u8]) -> Result<Vec<u8>, String> {
        if server_first.len() > MAX_MESSAGE {
            return Err("server-first message too long".into());
        }
        let text =
            std::str::from_utf8(server_first).map_err(|_| "server-first message is not UTF-8")?;
        if let Some(e) = attribute(text, 'e') {
            return Err(format!("the broker refused: {e}"));
        }
        let nonce = attribute(text, 'r').ok_or("no nonce in server-first")?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err("the broker's nonce does not extend ours".into());
        }
        let salt = B64
            .decode(attribute(text, 's').ok_or("no salt in server-first")?)
            .map_err(|e| format!("salt: {e}"))?;
        let iterations: u32 = attribute(text, 'i')
            .and_then(|i| i.parse().ok())
            .ok_or("no iteration count in server-first")?;
        if !(1..=MAX_ITERATIONS).contains(&iterations) {
            return Err(format!(
                "iteration count {iterations} outside 1..={MAX_ITERATIONS}"
            ));
        }
        let (alg, len) = if self.sha512 {
            (pbkdf2::PBKDF2_HMAC_SHA512, 64)
        } else {
            (pbkdf2::PBKDF2_HMAC_SHA256, 32)
        };
        let mut salted = vec![0u8; len];
        let rounds = NonZeroU32::new(iterations).ok_or("zero iterations")?;
        pbkdf2::derive(alg, rounds, &salt, self.password.as_bytes(), &mut salted);
        let client_key = self.hmac(&salted, b"Client Key");
        let stored_key = self.hash(&client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let signature = self.hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = self.hmac(&salted, b"Server Key");
        self.server_signature = Some(self.hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Checks the broker's server-final message: it must prove it knows the password too.
    pub fn finish(&self, server_final: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(&server_final[..server_final.len().min(MAX_MESSAGE)])
            .map_err(|_| "server-final message is not UTF-8")?;
        if let Some(e) = attribute(text, 'e') {
            return Err(format!("the broker refused: {e}"));
        }
        let v = B64
            .decode(attribute(text, 'v').ok_or("no verifier in server-final")?)
            .map_err(|e| format!("verifier: {e}"))?;
        match &self.server_signature {
            Some(expected) if crate::tls::secrets_equal(expected, &v) => Ok(()),
            _ => Err("the broker's signature does not match: it does not know the password".into()),
        }
    }
}

/// A fresh client nonce: 24 random bytes, base64 (printable, no comma).
pub fn nonce() -> Result<String, String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 24];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "no randomness for a SCRAM nonce")?;
    Ok(B64.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(mechanism: Mechanism, user: &str, password: &str) -> Credentials {
        Credentials {
            mechanism,
            username: user.into(),
            password: password.into(),
        }
    }

    /// RFC 7677, section 3: the SCRAM-SHA-256 example exchange, byte for byte.
    #[test]
    fn scram_sha_256_matches_the_rfc_example() {
        let (ex, first) = Exchange::start(
            &creds(Mechanism::ScramSha256, "user", "pencil"),
            "rOprNGfwEbeRWgbNEkqO",
        );
        assert_eq!(first, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let Exchange::Scram(mut scram) = ex else {
            panic!("scram")
        };
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let final_ = scram.answer(server_first).expect("answer");
        assert_eq!(
            String::from_utf8(final_).unwrap(),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert!(scram
            .finish(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .is_ok());
        assert!(
            scram
                .finish(b"v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
                .is_err(),
            "a broker that does not know the password is not believed"
        );
    }

    #[test]
    fn a_hostile_server_first_is_refused_cheaply() {
        let c = creds(Mechanism::ScramSha512, "a=b,c", "p");
        let (ex, first) = Exchange::start(&c, "abc");
        assert_eq!(first, b"n,,n=a=3Db=2Cc,r=abc", "user names are escaped");
        let Exchange::Scram(mut scram) = ex else {
            panic!("scram")
        };
        for bad in [
            &b"r=abcd,s=AAAA,i=100000000"[..],
            b"r=xyz1,s=AAAA,i=4096",
            b"r=abc,s=AAAA,i=4096",
            b"r=abcd,s=!!!,i=4096",
            b"r=abcd,s=AAAA",
            b"e=invalid-proof",
            &[b'r'; 2000],
        ] {
            assert!(
                scram.answer(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(
            scram.finish(b"v=AAAA").is_err(),
            "no answer sent, nothing to verify"
        );
    }

    #[test]
    fn plain_sends_the_identity_and_password() {
        let (_, first) = Exchange::start(&creds(Mechanism::Plain, "alice", "s3cret"), "");
        assert_eq!(first, b"\0alice\0s3cret");
    }
}
