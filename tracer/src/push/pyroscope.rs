//! `--pyroscope URL`: every interval, the current profile (the `--pprof` profile, gzipped)
//! goes to Grafana Pyroscope's ingest API, as its Go client sends it:
//! `POST {URL}/ingest?name=SERVICE{labels}&from=&until=&spyName=memtrace` with a
//! multipart body of a `profile` part and a `sample_type_config` part (which sample types
//! are in-use gauges). No `format` parameter: Pyroscope reads a multipart body from its
//! content type, and `format=pprof` would make it read the body as a bare profile.
//! The pushes themselves run in a [`super::Pusher`].

use std::fmt::Write as _;

use serde::Serialize;

use crate::{export::pprof, report::Report};

/// Bearer token for the ingest endpoint.
pub const TOKEN_ENV: &str = "MEMTRACE_PYROSCOPE_TOKEN";
/// `user:password` for HTTP basic authentication (Grafana Cloud: instance id and token).
pub const BASIC_AUTH_ENV: &str = "MEMTRACE_PYROSCOPE_BASIC_AUTH";
/// Tenant (`X-Scope-OrgID`) of a multi-tenant Pyroscope.
pub const TENANT_ENV: &str = "MEMTRACE_PYROSCOPE_TENANT";

#[derive(Debug, thiserror::Error)]
pub enum PyroscopeError {
    #[error("--pyroscope {0:?}: not an http:// or https:// URL")]
    Url(String),
    #[error("--label {0:?}: expected key=value, the key a label name ([a-zA-Z_][a-zA-Z0-9_.]*)")]
    Label(String),
    #[error("--label {0:?}: the value may not contain ',', '{{', '}}', '=' or a newline")]
    LabelValue(String),
    #[error("{BASIC_AUTH_ENV} must be user:password")]
    BasicAuth,
}

/// Parses `key=value` (for clap).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    let (key, value) = s.split_once('=').ok_or_else(|| PyroscopeError::Label(s.to_string()).to_string())?;
    let mut chars = key.chars();
    let key_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if !key_ok {
        return Err(PyroscopeError::Label(s.to_string()).to_string());
    }
    if value.is_empty() || value.contains([',', '{', '}', '=', '\n']) {
        return Err(PyroscopeError::LabelValue(s.to_string()).to_string());
    }
    Ok((key.to_string(), value.to_string()))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    None,
    Bearer(String),
    Basic { user: String, password: String },
}

impl Auth {
    /// From [`TOKEN_ENV`] or [`BASIC_AUTH_ENV`] (the token wins if both are set).
    pub fn from_env() -> Result<Self, PyroscopeError> {
        if let Some(token) = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()) {
            return Ok(Self::Bearer(token));
        }
        match std::env::var(BASIC_AUTH_ENV).ok().filter(|t| !t.is_empty()) {
            Some(pair) => {
                let (user, password) = pair.split_once(':').ok_or(PyroscopeError::BasicAuth)?;
                Ok(Self::Basic { user: user.to_string(), password: password.to_string() })
            }
            None => Ok(Self::None),
        }
    }
}

/// Where and as what the profiles go.
#[derive(Clone, Debug)]
pub struct Target {
    /// The ingest endpoint: the base URL with `/ingest` appended to its path.
    pub ingest: reqwest::Url,
    /// `service_name`: `--label service_name=...`, else the target's command name.
    pub service: String,
    /// The other labels, sorted by key.
    pub labels: Vec<(String, String)>,
    pub auth: Auth,
    pub tenant: Option<String>,
}

impl Target {
    pub fn new(
        url: &str,
        labels: &[(String, String)],
        comm: &str,
        auth: Auth,
    ) -> Result<Self, PyroscopeError> {
        let mut ingest = reqwest::Url::parse(url).map_err(|_| PyroscopeError::Url(url.to_string()))?;
        if !matches!(ingest.scheme(), "http" | "https") || ingest.cannot_be_a_base() {
            return Err(PyroscopeError::Url(url.to_string()));
        }
        let path = format!("{}/ingest", ingest.path().trim_end_matches('/'));
        ingest.set_path(&path);
        let mut service = labels.iter().find(|(k, _)| k == "service_name").map(|(_, v)| v.clone());
        // A command name can hold characters the name syntax reserves.
        let comm: String = comm
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
            .collect();
        service.get_or_insert_with(|| if comm.is_empty() { "memtrace".to_string() } else { comm });
        let mut labels: Vec<(String, String)> =
            labels.iter().filter(|(k, _)| k != "service_name").cloned().collect();
        labels.sort();
        labels.dedup_by(|a, b| a.0 == b.0);
        let tenant = std::env::var(TENANT_ENV).ok().filter(|t| !t.is_empty());
        Ok(Self { ingest, service: service.unwrap_or_default(), labels, auth, tenant })
    }

    /// `service{k=v,...}`: Pyroscope's name syntax; the part before the braces becomes
    /// the `service_name` label.
    #[must_use]
    pub fn app_name(&self) -> String {
        let mut name = self.service.clone();
        if !self.labels.is_empty() {
            let labels: Vec<String> = self.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = write!(name, "{{{}}}", labels.join(","));
        }
        name
    }
}

/// How Pyroscope should treat one sample type (its `SampleTypeConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SampleTypeConfig {
    pub units: &'static str,
    /// `average` for gauges (held bytes): profiles over a range are averaged, not summed.
    pub aggregation: &'static str,
    #[serde(rename = "display-name", skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    pub cumulative: bool,
}

/// Every sample type of the report's profile is a gauge of what is held now (or of its
/// growth rate): none is cumulative.
#[must_use]
pub fn sample_type_config(report: &Report) -> std::collections::BTreeMap<String, SampleTypeConfig> {
    pprof::sample_types(report)
        .into_iter()
        .map(|(ty, unit)| {
            let units = match unit {
                "count" => "objects",
                _ => "bytes",
            };
            let display_name = (ty == "growth_rate").then(|| "growth_bytes_per_second".to_string());
            (ty, SampleTypeConfig { units, aggregation: "average", display_name, cumulative: false })
        })
        .collect()
}

impl Target {
    /// The ingest request for `report`, covering `from..until` (Unix seconds).
    pub(super) fn request(
        &self,
        client: &reqwest::Client,
        report: &Report,
        from: u64,
        until: u64,
    ) -> Result<reqwest::RequestBuilder, String> {
        let mut profile = Vec::new();
        pprof::write_pprof(report, &mut profile).map_err(|e| format!("encode the profile: {e}"))?;
        let config = serde_json::to_vec(&sample_type_config(report)).map_err(|e| e.to_string())?;
        let part = |bytes: Vec<u8>, file: &'static str| {
            reqwest::multipart::Part::bytes(bytes)
                .file_name(file)
                .mime_str("application/octet-stream")
                .map_err(|e| e.to_string())
        };
        let form = reqwest::multipart::Form::new()
            .part("profile", part(profile, "profile.pprof")?)
            .part("sample_type_config", part(config, "sample_type_config.json")?);
        let query = [
            ("name", self.app_name()),
            ("from", from.to_string()),
            ("until", until.to_string()),
            ("spyName", "memtrace".to_string()),
        ];
        let mut request = client.post(self.ingest.clone()).query(&query).multipart(form);
        request = match &self.auth {
            Auth::None => request,
            Auth::Bearer(token) => request.bearer_auth(token),
            Auth::Basic { user, password } => request.basic_auth(user, Some(password)),
        };
        if let Some(tenant) = &self.tenant {
            request = request.header("X-Scope-OrgID", tenant);
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[&str]) -> Vec<(String, String)> {
        pairs.iter().map(|p| parse_label(p).expect("valid label")).collect()
    }

    #[test]
    fn name_is_the_service_with_sorted_labels() {
        let t = Target::new(
            "https://pyro.example:4040/base/",
            &labels(&["region=eu", "env=prod"]),
            "node",
            Auth::None,
        )
        .expect("valid target");
        assert_eq!(t.ingest.as_str(), "https://pyro.example:4040/base/ingest");
        assert_eq!(t.app_name(), "node{env=prod,region=eu}");
        let t = Target::new("http://127.0.0.1:4040", &labels(&["service_name=orders"]), "node", Auth::None)
            .expect("valid target");
        assert_eq!((t.ingest.as_str(), t.app_name().as_str()), ("http://127.0.0.1:4040/ingest", "orders"));
        let t = Target::new("http://h", &[], "my app{1}", Auth::None).expect("valid target");
        assert_eq!(t.app_name(), "my_app_1_");
    }

    #[test]
    fn bad_urls_and_labels_are_refused() {
        assert!(Target::new("ftp://h", &[], "x", Auth::None).is_err());
        assert!(Target::new("localhost:4040", &[], "x", Auth::None).is_err());
        for bad in ["noequals", "1x=y", "a-b=c", "k=", "k=a,b", "k=a}"] {
            assert!(parse_label(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(parse_label("k8s.pod=web-1"), Ok(("k8s.pod".to_string(), "web-1".to_string())));
    }

    #[test]
    fn every_sample_type_is_an_averaged_gauge() {
        let report = crate::export::fixture::sample_report();
        let config = sample_type_config(&report);
        let types: Vec<String> = pprof::sample_types(&report).into_iter().map(|(t, _)| t).collect();
        assert_eq!(
            config.keys().cloned().collect::<std::collections::BTreeSet<_>>(),
            types.into_iter().collect()
        );
        let json = serde_json::to_value(&config).expect("serializes");
        assert_eq!(
            json["inuse_space"],
            serde_json::json!({"units": "bytes", "aggregation": "average", "cumulative": false})
        );
        assert_eq!(json["inuse_objects"]["units"], "objects");
        assert_eq!(json["growth_rate"]["display-name"], "growth_bytes_per_second");
    }
}
