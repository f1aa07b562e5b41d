//! The request headers of an HBONE `CONNECT`, as ztunnel sends and reads them: `traceparent`
//! (W3C Trace Context), `baggage` (W3C Baggage, with ztunnel's keys) and `forwarded`. They are for
//! correlation only: nothing is decided on them, and a malformed one is ignored, never refused.
//!
//! Each tunnelled connection starts a trace of its own (sampled at `--trace-sampling` when tracing
//! is on, else never); both ends log the same `traceparent`, which is what ties a client's
//! access-log record to the server's, and with tracing on each end exports the tunnel's span.

use std::net::SocketAddr;

use crate::telemetry::trace::parse_traceparent;

pub(crate) const TRACEPARENT: &str = "traceparent";
pub(crate) const BAGGAGE: &str = "baggage";
pub(crate) const FORWARDED: &str = "forwarded";

/// `value` when it is a valid `traceparent` ([`parse_traceparent`]), for the access log.
pub(crate) fn valid_traceparent(value: &str) -> Option<&str> {
    parse_traceparent(value.as_bytes()).map(|_| value)
}

/// What this proxy knows of its own workload, for `baggage`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Workload {
    /// The pod's namespace (`POD_NAMESPACE`), else the identity's.
    pub(crate) namespace: String,
    /// The pod's name (`POD_NAME`), when the downward API gives it.
    pub(crate) pod_name: Option<String>,
    /// `--workload-name`, when given.
    pub(crate) workload: Option<String>,
}

impl Workload {
    /// From the identity's namespace and the pod's variables (`POD_NAME`, `POD_NAMESPACE`).
    pub(crate) fn new(
        identity_namespace: &str,
        pod_name: Option<String>,
        pod_namespace: Option<String>,
    ) -> Workload {
        let present = |v: Option<String>| v.filter(|v| !v.is_empty());
        Workload {
            namespace: present(pod_namespace).unwrap_or_else(|| identity_namespace.to_owned()),
            pod_name: present(pod_name),
            workload: None,
        }
    }

    /// With `--workload-name`: sent as ztunnel sends a Deployment's name, so that a peer's
    /// Istio metrics name this workload as its own do.
    pub(crate) fn with_workload(mut self, workload: Option<String>) -> Workload {
        self.workload = workload.filter(|w| !w.is_empty());
        self
    }

    /// The `baggage` value, with ztunnel's keys:
    /// `k8s.namespace.name=<ns>[,k8s.pod.name=<pod>][,k8s.deployment.name=<workload>]`.
    /// (ztunnel has no key for a service account; the certificate already carries it.)
    pub(crate) fn baggage(&self) -> String {
        let mut out = String::from("k8s.namespace.name=");
        push_baggage_value(&mut out, &self.namespace);
        if let Some(pod) = &self.pod_name {
            out.push_str(",k8s.pod.name=");
            push_baggage_value(&mut out, pod);
        }
        if let Some(workload) = &self.workload {
            out.push_str(",k8s.deployment.name=");
            push_baggage_value(&mut out, workload);
        }
        out
    }
}

/// Appends `value` percent-encoded as W3C Baggage requires: every byte outside `baggage-octet`,
/// plus `%` (the escape itself) and `=` (ztunnel splits members on it).
fn push_baggage_value(out: &mut String, value: &str) {
    for b in value.bytes() {
        let plain = matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e)
            && b != b'%'
            && b != b'=';
        if plain {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// `forwarded: for="<client ip:port>"` (RFC 7239: quoted, as an IPv6 address with a port must be).
pub(crate) fn forwarded(client: SocketAddr) -> String {
    format!("for=\"{client}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_read_leniently_but_only_when_well_formed() {
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(valid_traceparent(good), Some(good));
        // A later version may append fields.
        let future = "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what";
        assert_eq!(valid_traceparent(future), Some(future));
        for bad in [
            "",
            "garbage",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333g-01",
            "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
        ] {
            assert_eq!(valid_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn baggage_has_ztunnels_keys() {
        let w = Workload::new("shop", Some("web-7d4b9".into()), Some("store".into()));
        assert_eq!(
            w.baggage(),
            "k8s.namespace.name=store,k8s.pod.name=web-7d4b9"
        );
        // Without the downward API: the identity's namespace, no pod name.
        let w = Workload::new("shop", None, Some(String::new()));
        assert_eq!(w.baggage(), "k8s.namespace.name=shop");
        let w =
            Workload::new("shop", Some("web-7d4b9".into()), None).with_workload(Some("web".into()));
        assert_eq!(
            w.baggage(),
            "k8s.namespace.name=shop,k8s.pod.name=web-7d4b9,k8s.deployment.name=web"
        );
    }

    #[test]
    fn baggage_values_are_percent_encoded_where_w3c_requires() {
        let w = Workload::new("a b,c;d\"e\\f%g=h", Some("ü".into()), None);
        assert_eq!(
            w.baggage(),
            "k8s.namespace.name=a%20b%2Cc%3Bd%22e%5Cf%25g%3Dh,k8s.pod.name=%C3%BC"
        );
        // Every byte of the value is a baggage-octet, so the header splits into exactly the members.
        let header = w.baggage();
        assert!(
            header.bytes().all(|b| (0x21..=0x7e).contains(&b)),
            "{header}"
        );
        assert_eq!(header.split(',').count(), 2);
        assert!(header.split(',').all(|m| m.matches('=').count() == 1));
    }

    #[test]
    fn forwarded_quotes_the_client() {
        assert_eq!(
            forwarded("198.18.0.7:40000".parse().expect("address")),
            "for=\"198.18.0.7:40000\""
        );
        assert_eq!(
            forwarded("[2001:db8::1]:40000".parse().expect("address")),
            "for=\"[2001:db8::1]:40000\""
        );
    }
}
