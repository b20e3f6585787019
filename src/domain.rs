//! The domain: a validated, normalized [`CustomerEmail`] and the [`Credentials`] record callers get.

use std::fmt;

use serde::Serialize;

/// Longest accepted address, in bytes (RFC 5321's path limit less the angle brackets).
pub const MAX_EMAIL_BYTES: usize = 254;

/// Why a string is not an acceptable customer e-mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EmailError {
    /// Nothing but whitespace.
    #[error("the address is empty")]
    Empty,
    /// Over [`MAX_EMAIL_BYTES`].
    #[error("the address is longer than 254 bytes")]
    TooLong,
    /// No `@`.
    #[error("the address has no `@`")]
    MissingAt,
    /// Nothing before the last `@`.
    #[error("the address has an empty local part")]
    EmptyLocal,
    /// Nothing after the last `@`.
    #[error("the address has an empty domain")]
    EmptyDomain,
    /// Whitespace inside the address.
    #[error("the address contains whitespace")]
    Whitespace,
    /// A control character anywhere.
    #[error("the address contains a control character")]
    Control,
}

/// A customer e-mail, trimmed and lowercased, known to be acceptable.
///
/// The normalized form is what the cache is keyed by and what is sent to the partner.
/// `Display` and `Debug` mask it (`j***@email.com`): an address is personal data and must not
/// reach a log whole. [`CustomerEmail::as_str`] is the deliberate way to the full value.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CustomerEmail(Box<str>);

impl CustomerEmail {
    /// Trims, lowercases (Unicode) and validates an address.
    pub fn parse(raw: &str) -> Result<Self, EmailError> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(EmailError::Empty);
        }
        // Checked on the input too: lowercasing can change the length, and a huge input should not
        // be copied before it is refused.
        if trimmed.len() > MAX_EMAIL_BYTES * 3 {
            return Err(EmailError::TooLong);
        }
        let normalized = if trimmed.bytes().any(|b| b.is_ascii_uppercase() || b >= 0x80) {
            trimmed.to_lowercase()
        } else {
            trimmed.to_owned()
        };
        if normalized.len() > MAX_EMAIL_BYTES {
            return Err(EmailError::TooLong);
        }
        if normalized.chars().any(char::is_control) {
            return Err(EmailError::Control);
        }
        if normalized.chars().any(char::is_whitespace) {
            return Err(EmailError::Whitespace);
        }
        let (local, domain) = normalized.rsplit_once('@').ok_or(EmailError::MissingAt)?;
        if local.is_empty() {
            return Err(EmailError::EmptyLocal);
        }
        if domain.is_empty() {
            return Err(EmailError::EmptyDomain);
        }
        Ok(Self(normalized.into_boxed_str()))
    }

    /// The full normalized address. Never log it: use `Display`, which masks.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CustomerEmail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_email(&self.0))
    }
}

impl fmt::Debug for CustomerEmail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CustomerEmail({self})")
    }
}

/// Masks an address for logs: first character of the local part, `***`, then the domain
/// (`john@email.com` → `j***@email.com`). Anything without an `@` is masked whole.
pub fn mask_email(email: &str) -> String {
    match email.rsplit_once('@') {
        Some((local, domain)) => {
            let first = local.chars().next().map(String::from).unwrap_or_default();
            format!("{first}***@{domain}")
        }
        None => "***".to_owned(),
    }
}

/// Masks every e-mail-looking word inside free text (a partner error description can quote the
/// address it was asked about).
pub fn mask_emails_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        if word.contains('@') {
            out.push_str(&mask_email(word));
        } else if let Some(at) = word.to_ascii_lowercase().find("%40") {
            // A percent-encoded address is still an address.
            out.push_str(&mask_email(&format!("{}@{}", &word[..at], &word[at + 3..])));
        } else {
            out.push_str(word);
        }
    }
    out
}

/// The normalized customer record returned to callers (SPEC section 2).
///
/// `customer_key` is a secret: this type is only ever serialized into a response body, and its
/// `Debug` leaves the key out.
#[derive(Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Credentials {
    /// The normalized address that was looked up.
    pub customer_email: String,
    /// The customer's key at Skypostal.
    pub customer_key: String,
    /// The customer's box number.
    pub customer_box_id: i64,
    /// Given name, as the partner has it.
    pub customer_first_name: Option<String>,
    /// Family name, as the partner has it.
    pub customer_last_name: Option<String>,
    /// RFC 3339 in the partner's stated offset, or `None` for no date.
    pub activation_date: Option<String>,
    /// RFC 3339 in the partner's stated offset, or `None` for no date.
    pub enrolment_date: Option<String>,
    /// Account flags, as the partner has them.
    pub is_active: Option<bool>,
    /// See `is_active`.
    pub is_business: Option<bool>,
    /// See `is_active`.
    pub is_enable: Option<bool>,
    /// See `is_active`.
    pub is_vip: Option<bool>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("customer_email", &mask_email(&self.customer_email))
            .field("customer_key", &"[redacted]")
            .field("customer_box_id", &self.customer_box_id)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_trims_and_lowercases() {
        let e = CustomerEmail::parse("  John.Doe@Example.COM \t").unwrap();
        assert_eq!(e.as_str(), "john.doe@example.com");
    }

    #[test]
    fn parse_lowercases_non_ascii_letters() {
        let e = CustomerEmail::parse("ÉLODIE@Exemple.fr").unwrap();
        assert_eq!(e.as_str(), "élodie@exemple.fr");
    }

    #[test]
    fn parse_keeps_quotes_and_backslashes_which_are_valid_in_local_parts() {
        let e = CustomerEmail::parse(r#""a\b"@example.com"#).unwrap();
        assert_eq!(e.as_str(), r#""a\b"@example.com"#);
    }

    #[test]
    fn parse_rejects_what_the_spec_rejects() {
        let cases = [
            ("", EmailError::Empty),
            ("   ", EmailError::Empty),
            ("john.example.com", EmailError::MissingAt),
            ("@example.com", EmailError::EmptyLocal),
            ("john@", EmailError::EmptyDomain),
            ("jo hn@example.com", EmailError::Whitespace),
            ("john@exa\u{a0}mple.com", EmailError::Whitespace),
            ("jo\u{7}hn@example.com", EmailError::Control),
            ("john@example.com\n@x", EmailError::Control),
        ];
        for (input, expected) in cases {
            assert_eq!(CustomerEmail::parse(input), Err(expected), "{input:?}");
        }
    }

    #[test]
    fn parse_enforces_254_bytes_after_normalization() {
        let domain = "@example.com";
        let ok = format!("{}{domain}", "a".repeat(MAX_EMAIL_BYTES - domain.len()));
        assert!(CustomerEmail::parse(&ok).is_ok());
        let long = format!("{}{domain}", "a".repeat(MAX_EMAIL_BYTES - domain.len() + 1));
        assert_eq!(CustomerEmail::parse(&long), Err(EmailError::TooLong));
        // 122 two-byte letters plus the domain: 134 characters, 256 bytes.
        let wide = format!("{}{domain}", "é".repeat(122));
        assert_eq!(CustomerEmail::parse(&wide), Err(EmailError::TooLong));
    }

    #[test]
    fn display_and_debug_mask_the_address() {
        let e = CustomerEmail::parse("john.doe@email.com").unwrap();
        assert_eq!(e.to_string(), "j***@email.com");
        assert!(!format!("{e:?}").contains("john.doe"));
    }

    #[test]
    fn mask_handles_odd_shapes() {
        assert_eq!(mask_email("é@x.org"), "é***@x.org");
        assert_eq!(mask_email("nothing"), "***");
        assert_eq!(
            mask_emails_in("no customer john@x.org here"),
            "no customer j***@x.org here"
        );
        assert_eq!(mask_emails_in("see john%40x.org"), "see j***@x.org");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(10_000))]

        /// Any input: no panic; an accepted address is a fixed point and meets every rule.
        #[test]
        fn parse_never_panics_and_accepts_only_valid_addresses(raw in "\\PC{0,300}|[a-zA-Z0-9.\"\\\\ +@\u{e9}\u{130}\u{0}-\u{1f}]{0,80}") {
            if let Ok(email) = CustomerEmail::parse(&raw) {
                let s = email.as_str();
                proptest::prop_assert!(s.len() <= MAX_EMAIL_BYTES);
                proptest::prop_assert!(!s.chars().any(|c| c.is_whitespace() || c.is_control()));
                let (local, domain) = s.rsplit_once('@').expect("has @");
                proptest::prop_assert!(!local.is_empty() && !domain.is_empty());
                let again = CustomerEmail::parse(s);
                proptest::prop_assert_eq!(again.as_ref().map(CustomerEmail::as_str), Ok(s));
                let masked = email.to_string();
                proptest::prop_assert!(masked.contains("***@"));
            }
        }
    }

    #[test]
    fn credentials_debug_hides_the_customer_key() {
        let c = Credentials {
            customer_email: "john@x.org".into(),
            customer_key: "SECRETKEY".into(),
            customer_box_id: 1,
            customer_first_name: None,
            customer_last_name: None,
            activation_date: None,
            enrolment_date: None,
            is_active: None,
            is_business: None,
            is_enable: None,
            is_vip: None,
        };
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("SECRETKEY") && !dbg.contains("john@"),
            "{dbg}"
        );
    }
}
