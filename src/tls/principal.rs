//! The Kafka principal of a client certificate, derived the way Kafka's default SSL principal builder
//! derives it: the subject's distinguished name in RFC 2253 form (`CN=alice,OU=eng,O=Example`, most
//! specific first, as Java's `X500Principal.getName()` writes it), put through
//! `ssl.principal.mapping.rules` (`DEFAULT`, and `RULE:pattern/replacement/[LU]`), then `User:` in
//! front. Policy rules with `principals` match it as they match SASL principals.

use regex::Regex;
use x509_parser::prelude::*;

/// One mapping rule.
#[derive(Debug, Clone)]
pub enum Rule {
    /// The distinguished name as it is.
    Default,
    /// When `pattern` matches the whole name, the name becomes `replacement` (`$1` ... refer to the
    /// pattern's groups), then lower- or upper-cased if asked.
    Replace {
        pattern: Regex,
        replacement: String,
        case: Case,
        /// As written, for messages and equality.
        text: String,
    },
}

impl PartialEq for Rule {
    fn eq(&self, other: &Rule) -> bool {
        match (self, other) {
            (Rule::Default, Rule::Default) => true,
            (Rule::Replace { text: a, .. }, Rule::Replace { text: b, .. }) => a == b,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    Keep,
    Lower,
    Upper,
}

/// Reads one rule as Kafka writes it: `DEFAULT` or `RULE:pattern/replacement/` with an optional `L` or
/// `U` after the last slash. A slash inside the pattern or replacement is written `\/`.
pub fn parse_rule(text: &str) -> Result<Rule, String> {
    let text = text.trim();
    if text == "DEFAULT" {
        return Ok(Rule::Default);
    }
    let Some(body) = text.strip_prefix("RULE:") else {
        return Err(format!(
            "'{text}': expected DEFAULT or RULE:pattern/replacement/[LU]"
        ));
    };
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = body.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'/') => {
                current.push('/');
                chars.next();
            }
            '/' => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    let flags = current;
    let [pattern, replacement] = <[String; 2]>::try_from(parts)
        .map_err(|_| format!("'{text}': expected RULE:pattern/replacement/[LU]"))?;
    let case = match flags.as_str() {
        "" => Case::Keep,
        "L" => Case::Lower,
        "U" => Case::Upper,
        f => return Err(format!("'{text}': unknown flag '{f}' (L or U)")),
    };
    // Kafka matches the whole name (Java's Matcher.matches()).
    let pattern = Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| format!("'{text}': invalid pattern: {e}"))?;
    Ok(Rule::Replace {
        pattern,
        replacement,
        case,
        text: text.to_string(),
    })
}

/// The principal name for a distinguished name: the first rule that applies decides; with no rule
/// that applies, none (Kafka refuses such a client; the proxy gives it no certificate principal).
pub fn map(dn: &str, rules: &[Rule]) -> Option<String> {
    if rules.is_empty() {
        return Some(dn.to_string());
    }
    for rule in rules {
        match rule {
            Rule::Default => return Some(dn.to_string()),
            Rule::Replace {
                pattern,
                replacement,
                case,
                ..
            } => {
                if pattern.is_match(dn) {
                    let out = pattern.replace(dn, replacement.as_str()).into_owned();
                    return Some(match case {
                        Case::Keep => out,
                        Case::Lower => out.to_lowercase(),
                        Case::Upper => out.to_uppercase(),
                    });
                }
            }
        }
    }
    None
}

/// The subject of a DER certificate in RFC 2253 form; `None` if it cannot be read.
pub fn subject_rfc2253(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(rfc2253(cert.subject()))
}

/// `User:` + the mapped subject of a client's certificate chain (its first certificate).
pub fn of_chain(chain: &[rustls::pki_types::CertificateDer<'_>], rules: &[Rule]) -> Option<String> {
    let dn = subject_rfc2253(chain.first()?.as_ref())?;
    map(&dn, rules).map(|name| format!("User:{name}"))
}

fn rfc2253(name: &X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let value = match atv.as_str() {
                        Ok(s) => escape(s),
                        Err(_) => format!("#{}", hex(atv.attr_value().data)),
                    };
                    format!("{}={value}", keyword(atv.attr_type()))
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    // RFC 2253 writes the most specific name first: the reverse of the certificate's order.
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// The keywords Java's RFC 2253 form uses; any other attribute is its dotted OID.
fn keyword(oid: &x509_parser::der_parser::oid::Oid<'_>) -> String {
    match oid.to_id_string().as_str() {
        "2.5.4.3" => "CN".into(),
        "2.5.4.6" => "C".into(),
        "2.5.4.7" => "L".into(),
        "2.5.4.8" => "ST".into(),
        "2.5.4.10" => "O".into(),
        "2.5.4.11" => "OU".into(),
        "2.5.4.9" => "STREET".into(),
        "0.9.2342.19200300.100.1.25" => "DC".into(),
        "0.9.2342.19200300.100.1.1" => "UID".into(),
        other => other.into(),
    }
}

/// RFC 2253 escaping: `,+"\<>;` anywhere, `#` or a space first, a space last.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What an operator checks on a certificate: its subject, its alternative names, when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub subject: String,
    pub alt_names: Vec<String>,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
}

/// The summary of a DER certificate; `None` if it cannot be read.
pub fn summary(der: &[u8]) -> Option<Summary> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let alt_names = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => format!("DNS:{d}"),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => format!(
                        "IP:{}",
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).unwrap_or_default())
                    ),
                    16 => format!(
                        "IP:{}",
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).unwrap_or_default())
                    ),
                    _ => format!("IP:{}", hex(ip)),
                },
                other => format!("{other}"),
            })
            .collect(),
        _ => Vec::new(),
    };
    Some(Summary {
        subject: rfc2253(cert.subject()),
        alt_names,
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Whether a certificate's subject alternative names (as [`Summary::alt_names`] lists them,
/// `DNS:name` / `IP:address`) cover `host`: exactly, or by a wildcard in the leftmost label only
/// (`*.example.com` covers `a.example.com`, not `a.b.example.com`), as clients check.
pub fn covers(alt_names: &[String], host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    alt_names.iter().any(|n| {
        let Some(name) = n.strip_prefix("DNS:").or_else(|| n.strip_prefix("IP:")) else {
            return false;
        };
        let name = name.to_ascii_lowercase();
        match name.strip_prefix("*.") {
            Some(parent) => host
                .split_once('.')
                .is_some_and(|(first, rest)| !first.is_empty() && rest == parent),
            None => name == host,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_mapping_rules() {
        let dn = "CN=Alice Smith,OU=payments,O=Example Corp,C=US";
        assert_eq!(map(dn, &[]).as_deref(), Some(dn), "no rules: DEFAULT");
        let cn = parse_rule("RULE:^CN=(.*?),OU=(.*?),O=.*$/$1@$2/L").unwrap();
        assert_eq!(map(dn, &[cn]).as_deref(), Some("alice smith@payments"));
        let upper = parse_rule("RULE:^CN=([^,]*),.*$/$1/U").unwrap();
        assert_eq!(map(dn, &[upper]).as_deref(), Some("ALICE SMITH"));
        // The first rule that matches the whole name decides; DEFAULT catches the rest.
        let other = parse_rule("RULE:^CN=bob,.*$/bob/").unwrap();
        assert_eq!(
            map(dn, &[other.clone(), Rule::Default]).as_deref(),
            Some(dn)
        );
        assert_eq!(map(dn, &[other]), None, "no rule applies");
        // A partial match is no match (Kafka uses Matcher.matches()).
        let partial = parse_rule("RULE:OU=payments/x/").unwrap();
        assert_eq!(map(dn, &[partial]), None);
        // Slashes escaped inside a rule.
        let slash = parse_rule(r"RULE:^CN=([^,]*),.*$/team\/$1/").unwrap();
        assert_eq!(map(dn, &[slash]).as_deref(), Some("team/Alice Smith"));
    }

    #[test]
    fn bad_rules_are_refused_with_the_rule_named() {
        for bad in [
            "RULE:x/y",
            "RULE:(/y/",
            "RULE:x/y/Q",
            "KERBEROS",
            "RULE:a/b/c/d/",
        ] {
            let e = parse_rule(bad).expect_err(bad);
            assert!(e.contains(bad.trim()), "{e}");
        }
    }

    #[test]
    fn subjects_in_rfc_2253_form_as_java_writes_them() {
        let mut params = rcgen::CertificateParams::new(vec!["client".into()]).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CountryName, "US");
        dn.push(rcgen::DnType::OrganizationName, "Example, Inc.");
        dn.push(rcgen::DnType::OrganizationalUnitName, "payments");
        dn.push(rcgen::DnType::CommonName, "alice");
        params.distinguished_name = dn;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            subject_rfc2253(cert.der()).as_deref(),
            Some(r"CN=alice,OU=payments,O=Example\, Inc.,C=US")
        );
        let chain = [cert.der().clone()];
        assert_eq!(
            of_chain(&chain, &[]).as_deref(),
            Some(r"User:CN=alice,OU=payments,O=Example\, Inc.,C=US")
        );
        assert_eq!(subject_rfc2253(b"not a certificate"), None);
        assert_eq!(escape(" #a "), r"\ #a\ ");
    }

    #[test]
    fn wildcards_cover_one_label() {
        let names = vec![
            "DNS:*.kafka.test".to_string(),
            "DNS:Bootstrap.example".to_string(),
        ];
        assert!(covers(&names, "broker-1.kafka.test"));
        assert!(covers(&names, "bootstrap.EXAMPLE"));
        assert!(!covers(&names, "a.broker-1.kafka.test"));
        assert!(!covers(&names, "kafka.test"));
        assert!(!covers(&names, "other.example"));
        assert!(covers(&["IP:127.0.0.1".to_string()], "127.0.0.1"));
    }
}
