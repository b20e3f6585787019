//! The partner's wire format and the mapping of its answers (SPEC section 3).
//!
//! The partner reports business errors inside HTTP 200 answers, as an array of records carrying
//! `_verify` and `error {error_description, error_location, system_error}`, and newer services an
//! `error_code`. Parsing is lenient (unknown fields, `error: null`, missing `error_code`, `null`
//! dates); the mapping is strict about what counts as a success.

use serde::{Deserialize, Serialize};

use super::wcf_date::parse_wcf_date;
use super::{PartnerAnswer, PartnerError};
use crate::domain::{Credentials, CustomerEmail};

/// `error_code` meaning the partner has no information about the customer.
pub const CODE_NO_INFORMATION: &str = "10001";
/// `error_code` meaning the partner refused our credentials.
pub const CODE_ACCESS_DENIED: &str = "13001";
/// `error_code` meaning the partner's service is unavailable.
pub const CODE_SERVICE_UNAVAILABLE: &str = "12001";

/// The body of a customer-get-info call. Serialized by serde, so any e-mail stays one JSON string.
#[derive(Serialize)]
pub struct PartnerRequest<'a> {
    /// Partner account number: a JSON number.
    pub user_code: u64,
    /// Partner secret.
    pub app_key: &'a str,
    /// Normalized customer address.
    pub customer_email: &'a str,
}

/// One record of the partner's answer array.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WireRecord {
    #[serde(rename = "_verify")]
    verify: Option<bool>,
    customer_key: Option<String>,
    customer_box_id: Option<i64>,
    customer_first_name: Option<String>,
    customer_last_name: Option<String>,
    activation_date: Option<String>,
    enrolment_date: Option<String>,
    is_active: Option<bool>,
    is_business: Option<bool>,
    is_enable: Option<bool>,
    is_vip: Option<bool>,
    error: Option<WireError>,
    error_code: Option<ErrorCode>,
}

/// The `error` member of a record.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct WireError {
    error_description: Option<String>,
    error_location: Option<String>,
    system_error: Option<bool>,
}

/// `error_code` arrives as a number, a string, or an empty string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ErrorCode {
    Number(i64),
    Text(String),
}

impl ErrorCode {
    fn normalized(&self) -> Option<String> {
        match self {
            Self::Number(0) => None,
            Self::Number(n) => Some(n.to_string()),
            Self::Text(s) if s.trim().is_empty() => None,
            Self::Text(s) => Some(s.trim().to_owned()),
        }
    }
}

/// The partner's error fields of one answer, for logs and `check-upstream` (never for callers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartnerErrorFields {
    /// `error.error_description`, e-mails masked.
    pub description: Option<String>,
    /// `error.error_location`.
    pub location: Option<String>,
    /// `error_code`, when present and not empty.
    pub code: Option<String>,
    /// `error.system_error`.
    pub system_error: bool,
}

/// Maps a 2xx body of the partner to an answer or an error.
pub fn map_answer(body: &[u8], email: &CustomerEmail) -> Result<PartnerAnswer, PartnerError> {
    let records: Vec<WireRecord> =
        serde_json::from_slice(body).map_err(|e| PartnerError::Unreadable {
            reason: format!("not the documented JSON array ({:?} error)", e.classify()),
        })?;
    let record = match records.len() {
        0 => return Ok(PartnerAnswer::NotFound { fields: None }),
        1 => records.into_iter().next().unwrap_or_default(),
        n => return Err(PartnerError::Ambiguous { records: n }),
    };

    let error = record.error.as_ref();
    let fields = PartnerErrorFields {
        description: error
            .and_then(|e| e.error_description.as_deref())
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(crate::domain::mask_emails_in),
        location: error
            .and_then(|e| e.error_location.as_deref())
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(crate::domain::mask_emails_in),
        code: record.error_code.as_ref().and_then(ErrorCode::normalized),
        system_error: error.and_then(|e| e.system_error).unwrap_or(false),
    };

    if fields.system_error {
        return Err(PartnerError::Rejected { fields });
    }
    match fields.code.as_deref() {
        Some(CODE_ACCESS_DENIED) => return Err(PartnerError::AccessDenied { fields }),
        Some(CODE_SERVICE_UNAVAILABLE) => return Err(PartnerError::Rejected { fields }),
        None | Some(CODE_NO_INFORMATION) => {}
        Some(_) => return Err(PartnerError::Rejected { fields }),
    }
    if record.verify == Some(false) {
        return Ok(PartnerAnswer::NotFound {
            fields: Some(fields),
        });
    }
    if fields.code.is_some() || fields.description.is_some() {
        // A record that claims success but carries an error: ambiguous, never served.
        return Err(PartnerError::Rejected { fields });
    }
    credentials(record, email).map(PartnerAnswer::Found)
}

fn credentials(record: WireRecord, email: &CustomerEmail) -> Result<Credentials, PartnerError> {
    let unreadable = |reason: &str| PartnerError::Unreadable {
        reason: reason.to_owned(),
    };
    let customer_key = record
        .customer_key
        .filter(|k| !k.is_empty())
        .ok_or_else(|| unreadable("a success record without customer_key"))?;
    let customer_box_id = record
        .customer_box_id
        .ok_or_else(|| unreadable("a success record without customer_box_id"))?;
    let date = |raw: Option<String>, name: &str| match raw {
        None => Ok(None),
        Some(raw) => parse_wcf_date(&raw).map_err(|e| PartnerError::Unreadable {
            reason: format!("{name}: {e}"),
        }),
    };
    Ok(Credentials {
        customer_email: email.as_str().to_owned(),
        customer_key,
        customer_box_id,
        customer_first_name: record.customer_first_name,
        customer_last_name: record.customer_last_name,
        activation_date: date(record.activation_date, "activation_date")?,
        enrolment_date: date(record.enrolment_date, "enrolment_date")?,
        is_active: record.is_active,
        is_business: record.is_business,
        is_enable: record.is_enable,
        is_vip: record.is_vip,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC_RECORD: &str = r#"[{"_verify":true,"activation_date":"/Date(1550761010000-0500)/",
        "customer_box_id":811111,"customer_first_name":"John",
        "customer_key":"YpbCNpzqxYqVWv+tzg4e4Ex6ALiT+DfKSYA3NY2dZcw=","customer_last_name":"Doe",
        "enrolment_date":"/Date(1550761008000-0500)/",
        "error":{"error_description":"","error_location":"","system_error":false},
        "is_active":true,"is_business":false,"is_enable":true,"is_vip":false}]"#;

    fn email() -> CustomerEmail {
        CustomerEmail::parse("johndoe@email.com").unwrap()
    }

    fn map(body: &str) -> Result<PartnerAnswer, PartnerError> {
        map_answer(body.as_bytes(), &email())
    }

    #[test]
    fn documented_record_maps_to_credentials() {
        let Ok(PartnerAnswer::Found(c)) = map(DOC_RECORD) else {
            panic!("not found")
        };
        assert_eq!(c.customer_email, "johndoe@email.com");
        assert_eq!(c.customer_box_id, 811111);
        assert_eq!(
            c.activation_date.as_deref(),
            Some("2019-02-21T09:56:50-05:00")
        );
        assert_eq!(
            c.enrolment_date.as_deref(),
            Some("2019-02-21T09:56:48-05:00")
        );
    }

    #[test]
    fn lenient_shapes_are_accepted() {
        let body = r#"[{"customer_key":"k","customer_box_id":1,"error":null,"activation_date":null,
            "error_code":"","extra":{"nested":[1,2]}}]"#;
        let Ok(PartnerAnswer::Found(c)) = map(body) else {
            panic!("not found")
        };
        assert_eq!(c.activation_date, None);
        assert_eq!(c.is_vip, None);
    }

    #[test]
    fn empty_array_and_unverified_records_are_not_found() {
        assert!(matches!(map("[]"), Ok(PartnerAnswer::NotFound { .. })));
        for code in [r#""""#, "10001", r#""10001""#, "null"] {
            let body = format!(
                r#"[{{"_verify":false,"error":{{"error_description":"no customer a@b.c","system_error":false}},"error_code":{code}}}]"#
            );
            let Ok(PartnerAnswer::NotFound { fields: Some(f) }) = map(&body) else {
                panic!("{body}")
            };
            assert_eq!(f.description.as_deref(), Some("no customer a***@b.c"));
        }
    }

    #[test]
    fn partner_faults_are_errors() {
        let cases = [
            r#"[{"_verify":false,"error":{"system_error":true}}]"#,
            r#"[{"_verify":false,"error_code":13001}]"#,
            r#"[{"_verify":false,"error_code":"12001"}]"#,
            r#"[{"_verify":false,"error_code":99999}]"#,
            r#"[{"_verify":true,"customer_key":"k","customer_box_id":1,"error":{"error_description":"oops"}}]"#,
            r#"[{"_verify":true,"customer_key":"k","customer_box_id":1,"error_code":10001}]"#,
        ];
        for body in cases {
            assert!(
                matches!(
                    map(body),
                    Err(PartnerError::Rejected { .. } | PartnerError::AccessDenied { .. })
                ),
                "{body}"
            );
        }
        assert!(matches!(
            map(r#"[{"error_code":13001}]"#),
            Err(PartnerError::AccessDenied { .. })
        ));
    }

    #[test]
    fn unreadable_and_ambiguous_bodies_are_errors() {
        for body in [
            "",
            "{}",
            "null",
            "<html>",
            r#"[{"customer_key":1}]"#,
            "[{}]",
        ] {
            assert!(
                matches!(map(body), Err(PartnerError::Unreadable { .. })),
                "{body}"
            );
        }
        let bad_date =
            r#"[{"customer_key":"k","customer_box_id":1,"activation_date":"yesterday"}]"#;
        assert!(matches!(
            map(bad_date),
            Err(PartnerError::Unreadable { .. })
        ));
        let two = format!("[{0},{0}]", &DOC_RECORD[1..DOC_RECORD.len() - 1]);
        assert!(matches!(
            map(&two),
            Err(PartnerError::Ambiguous { records: 2 })
        ));
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::String),
            Just(Value::from("/Date(1550761010000-0500)/")),
            Just(Value::from("/Date(-62135578800000-0500)/")),
        ];
        let keys = prop_oneof![
            Just("_verify".to_owned()),
            Just("customer_key".to_owned()),
            Just("customer_box_id".to_owned()),
            Just("activation_date".to_owned()),
            Just("enrolment_date".to_owned()),
            Just("error".to_owned()),
            Just("error_code".to_owned()),
            Just("error_description".to_owned()),
            Just("system_error".to_owned()),
            Just("is_vip".to_owned()),
            "[a-z_]{1,8}",
        ];
        leaf.prop_recursive(4, 64, 8, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(keys.clone(), inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5_000))]

        /// Any bytes: no panic.
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = map_answer(&body, &email());
        }

        /// Any JSON shaped like the partner's (records of the known fields, any types): no panic,
        /// and a success always carries a customer key.
        #[test]
        fn partner_shaped_json_never_panics(records in proptest::collection::vec(json_value(), 0..3)) {
            let body = serde_json::to_vec(&records).expect("serializable");
            if let Ok(PartnerAnswer::Found(c)) = map_answer(&body, &email()) {
                proptest::prop_assert!(!c.customer_key.is_empty());
                proptest::prop_assert_eq!(records.len(), 1);
            }
        }
    }

    #[test]
    fn request_body_stays_valid_json_for_any_email() {
        let body = serde_json::to_string(&PartnerRequest {
            user_code: 396,
            app_key: "k",
            customer_email: r#""a\b"@x.org"#,
        })
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["customer_email"], r#""a\b"@x.org"#);
        assert_eq!(v["user_code"], 396);
    }
}
