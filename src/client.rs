//! Who is on the other end of one client connection: what the proxy saw (the client's address, the
//! broker the connection stands for) and what it learned (the client id from a request header, the SASL
//! principal the broker accepted, or the principal of the client's TLS certificate). One value per
//! connection, shared by its two pumps; policies match
//! on it, audit lines and producer records are attributed from it.

use crate::protocol::cut_to;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, OnceLock};

/// Client ids are kept and printed cut to this many bytes (a 30 KB client id is not copied into every
/// audit line and producer record); policies match the whole id. The same bound as metric labels.
pub const MAX_KEPT_ID_BYTES: usize = 128;

#[derive(Debug)]
pub struct Client {
    pub address: SocketAddr,
    /// The broker this connection stands for (`None`: the bootstrap listener).
    pub broker_node_id: Option<i32>,
    client_id: OnceLock<String>,
    principal: OnceLock<String>,
    /// The principal of the certificate the client presented to a TLS listener (mTLS).
    certificate_principal: OnceLock<String>,
    /// A SASL exchange under way: the principal a SaslAuthenticate request offered and how many
    /// successful rounds confirm it (kept by the identity stage; both pumps touch it).
    pub(crate) sasl_offered: Mutex<Option<(String, u8)>>,
}

impl Client {
    pub fn new(address: SocketAddr, broker_node_id: Option<i32>) -> Client {
        Client {
            address,
            broker_node_id,
            client_id: OnceLock::new(),
            principal: OnceLock::new(),
            certificate_principal: OnceLock::new(),
            sasl_offered: Mutex::new(None),
        }
    }

    /// A client described rather than seen (`check-config --client-id ... --principal ...`, tests).
    pub fn described(address: IpAddr, client_id: Option<&str>, principal: Option<&str>) -> Client {
        let c = Client::new(SocketAddr::new(address, 0), None);
        if let Some(id) = client_id {
            c.learn_client_id(id);
        }
        if let Some(p) = principal {
            c.confirm_principal(p.to_string());
        }
        c
    }

    pub fn ip(&self) -> IpAddr {
        self.address.ip()
    }

    /// The whole client id, as sent (policies match on this).
    pub fn client_id(&self) -> Option<&str> {
        self.client_id.get().map(String::as_str)
    }

    /// The client id cut to [`MAX_KEPT_ID_BYTES`]: what audit lines, labels and records keep.
    pub fn client_id_kept(&self) -> Option<&str> {
        self.client_id().map(|id| cut_to(id, MAX_KEPT_ID_BYTES))
    }

    /// The principal the broker knows the client by: the SASL principal once the broker accepted the
    /// exchange that named it, else the client certificate's (as Kafka does: on a SASL_SSL listener
    /// SASL decides, on an SSL listener the certificate).
    pub fn principal(&self) -> Option<&str> {
        self.principal
            .get()
            .or(self.certificate_principal.get())
            .map(String::as_str)
    }

    /// The principal of the client's TLS certificate, set once when the handshake verified it.
    pub fn set_certificate_principal(&self, principal: String) {
        let _ = self.certificate_principal.set(principal);
    }

    /// Changes whenever something rules can match on is learned.
    pub fn facts_version(&self) -> u32 {
        u32::from(self.client_id.get().is_some())
            + 2 * u32::from(self.principal.get().is_some())
            + 4 * u32::from(self.certificate_principal.get().is_some())
    }

    /// The first client id learned stays (later headers are not trusted to change who it is).
    pub fn learn_client_id(&self, id: &str) {
        if self.client_id.get().is_none() {
            let _ = self.client_id.set(id.to_string());
        }
    }

    pub fn confirm_principal(&self, principal: String) {
        let _ = self.principal.set(principal);
    }
}
