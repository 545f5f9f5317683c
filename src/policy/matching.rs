//! Who and what a rule matches: topic names (exact, prefix, regex), client ids, client address ranges,
//! SASL principals (matched against a connection's [`Client`]).

use crate::client::Client;
use regex::RegexSet;
use std::collections::HashSet;
use std::net::IpAddr;

/// Names matched exactly, by prefix or by regular expression (any of them).
#[derive(Debug, Clone, Default)]
pub struct NameMatch {
    pub exact: HashSet<String>,
    pub prefix: Vec<String>,
    pub regex: Vec<String>,
    compiled: Option<RegexSet>,
}

impl PartialEq for NameMatch {
    fn eq(&self, other: &Self) -> bool {
        // `compiled` is derived from `regex`.
        self.exact == other.exact && self.prefix == other.prefix && self.regex == other.regex
    }
}

impl NameMatch {
    pub fn new(
        exact: Vec<String>,
        prefix: Vec<String>,
        regex: Vec<String>,
    ) -> Result<Self, String> {
        let compiled = if regex.is_empty() {
            None
        } else {
            Some(RegexSet::new(&regex).map_err(|e| e.to_string())?)
        };
        Ok(NameMatch {
            exact: exact.into_iter().collect(),
            prefix,
            regex,
            compiled,
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.exact.contains(name)
            || self.prefix.iter().any(|p| name.starts_with(p.as_str()))
            || self.compiled.as_ref().is_some_and(|r| r.is_match(name))
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefix.is_empty() && self.regex.is_empty()
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let mut exact: Vec<&String> = self.exact.iter().collect();
        exact.sort();
        parts.extend(exact.iter().map(|e| format!("'{e}'")));
        parts.extend(self.prefix.iter().map(|p| format!("'{p}*'")));
        parts.extend(self.regex.iter().map(|r| format!("/{r}/")));
        parts.join(", ")
    }
}

/// An address range: `10.0.0.0/8`, `::1/128`, or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub network: IpAddr,
    pub bits: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let network: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not an IP address or CIDR range"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => match b.trim().parse::<u8>() {
                Ok(b) if b <= max => b,
                _ => return Err(format!("'{s}': prefix length must be 0 to {max}")),
            },
        };
        let c = Cidr { network, bits };
        if !c.contains(network) || c.masked(network) != network {
            return Err(format!(
                "'{s}' has host bits set (did you mean {}/{bits}?)",
                c.masked(network)
            ));
        }
        Ok(c)
    }

    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let m = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                IpAddr::V4((u32::from(v4) & m).into())
            }
            IpAddr::V6(v6) => {
                let m = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v6) & m).into())
            }
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        ip.is_ipv4() == self.network.is_ipv4() && self.masked(ip) == self.network
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.bits)
    }
}

/// Who a rule applies to. Every condition given must hold; within one, any entry may match. A rule
/// with a client-id or principal condition does not match a client that has not (yet) told us one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientMatch {
    pub ids: Option<NameMatch>,
    pub addresses: Vec<Cidr>,
    pub principals: Option<HashSet<String>>,
}

impl ClientMatch {
    pub fn matches(&self, c: &Client) -> bool {
        if let Some(ids) = &self.ids {
            if !c.client_id().is_some_and(|id| ids.matches(id)) {
                return false;
            }
        }
        if !self.addresses.is_empty() && !self.addresses.iter().any(|n| n.contains(c.ip())) {
            return false;
        }
        if let Some(p) = &self.principals {
            if !c.principal().is_some_and(|x| p.contains(x)) {
                return false;
            }
        }
        true
    }

    pub fn is_everyone(&self) -> bool {
        self.ids.is_none() && self.addresses.is_empty() && self.principals.is_none()
    }

    pub fn describe(&self) -> String {
        if self.is_everyone() {
            return "every client".into();
        }
        let mut parts = Vec::new();
        if let Some(ids) = &self.ids {
            parts.push(format!("client id {}", ids.describe()));
        }
        if !self.addresses.is_empty() {
            let a: Vec<String> = self.addresses.iter().map(|c| c.to_string()).collect();
            parts.push(format!("address in {}", a.join(", ")));
        }
        if let Some(p) = &self.principals {
            let mut p: Vec<&String> = p.iter().collect();
            p.sort();
            let p: Vec<String> = p.iter().map(|s| format!("'{s}'")).collect();
            parts.push(format!("principal {}", p.join(", ")));
        }
        parts.join(" and ")
    }
}
