//! `--otlp-profiles URL`: every interval, the profile as OTLP profiles (the
//! `v1development` signal, alpha upstream) goes to `POST {URL}/v1development/profiles`
//! as `application/x-protobuf`, as an OpenTelemetry collector's OTLP/HTTP receiver takes
//! it. Headers (authentication) from `$OTEL_EXPORTER_OTLP_HEADERS`, as every OpenTelemetry
//! exporter reads them.

use crate::{export::otlp, report::Report};

/// `key=value,key2=value2` headers of every request.
pub const HEADERS_ENV: &str = "OTEL_EXPORTER_OTLP_HEADERS";

#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("--otlp-profiles {0:?}: not an http:// or https:// URL")]
    Url(String),
    #[error("{HEADERS_ENV}: {0:?} is not key=value")]
    Header(String),
}

/// Where and as whom the profiles go.
#[derive(Clone, Debug)]
pub struct Target {
    /// The base URL with `/v1development/profiles` appended to its path.
    pub endpoint: reqwest::Url,
    pub resource: otlp::Resource,
    pub headers: Vec<(String, String)>,
}

impl Target {
    /// `labels` become resource attributes; `service_name` (else the target's command
    /// name) becomes `service.name`.
    pub fn new(url: &str, labels: &[(String, String)], comm: &str) -> Result<Self, OtlpError> {
        let mut endpoint = reqwest::Url::parse(url).map_err(|_| OtlpError::Url(url.to_string()))?;
        if !matches!(endpoint.scheme(), "http" | "https") || endpoint.cannot_be_a_base() {
            return Err(OtlpError::Url(url.to_string()));
        }
        let path = format!("{}/v1development/profiles", endpoint.path().trim_end_matches('/'));
        endpoint.set_path(&path);
        let service = labels.iter().find(|(k, _)| k == "service_name").map_or_else(
            || if comm.is_empty() { "memtrace".to_string() } else { comm.to_string() },
            |(_, v)| v.clone(),
        );
        let attributes = labels.iter().filter(|(k, _)| k != "service_name").cloned().collect();
        let headers = parse_headers(&std::env::var(HEADERS_ENV).unwrap_or_default())?;
        Ok(Self { endpoint, resource: otlp::Resource { service, attributes }, headers })
    }

    pub(super) fn request(
        &self,
        client: &reqwest::Client,
        report: &Report,
        from: u64,
        until: u64,
    ) -> reqwest::RequestBuilder {
        let mut request = client
            .post(self.endpoint.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .body(otlp::encode(report, &self.resource, from, until));
        for (k, v) in &self.headers {
            request = request.header(k.as_str(), v.as_str());
        }
        request
    }
}

/// `k=v,k2=v2`, values percent-decoded as the OpenTelemetry specification says.
fn parse_headers(s: &str) -> Result<Vec<(String, String)>, OtlpError> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').ok_or_else(|| OtlpError::Header(pair.to_string()))?;
            let v = percent_decode(v.trim());
            Ok((k.trim().to_string(), v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_service_and_headers() {
        let labels =
            vec![("service_name".to_string(), "orders".to_string()), ("env".to_string(), "prod".to_string())];
        let t = Target::new("http://collector:4318/", &labels, "node").expect("valid");
        assert_eq!(t.endpoint.as_str(), "http://collector:4318/v1development/profiles");
        assert_eq!(t.resource.service, "orders");
        assert_eq!(t.resource.attributes, vec![("env".to_string(), "prod".to_string())]);
        assert_eq!(Target::new("http://c:4318", &[], "node").expect("valid").resource.service, "node");
        assert!(Target::new("collector:4318", &[], "x").is_err());
        assert_eq!(
            parse_headers("Authorization=Bearer%20s3cret, x-tenant = a").expect("valid"),
            vec![
                ("Authorization".to_string(), "Bearer s3cret".to_string()),
                ("x-tenant".to_string(), "a".to_string())
            ]
        );
        assert!(parse_headers("novalue").is_err());
    }
}
