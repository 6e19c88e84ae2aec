//! The corpus: several hundred individually named requests, each with the answer it must get,
//! built by category. [`build_corpus`] adds the categories in a fixed order, so a run sends the
//! same requests in the same order every time.

mod claims;
mod credentials;
pub mod providers;
mod signature;
mod structure;

use serde_json::Value;

use crate::expect::Expect;
use crate::forge::{now, Forge};

/// One request of the corpus and the answer it must get.
pub struct Case {
    pub name: String,
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub expect: Expect,
}

/// An `Authorization: Bearer {token}` header.
pub fn bearer_header(token: &str) -> Vec<(String, Vec<u8>)> {
    vec![(
        "Authorization".into(),
        format!("Bearer {token}").into_bytes(),
    )]
}

pub struct Corpus {
    pub cases: Vec<Case>,
}

impl Corpus {
    pub fn add(
        &mut self,
        name: impl Into<String>,
        headers: Vec<(String, Vec<u8>)>,
        expect: Expect,
    ) {
        self.add_at(name, "/mcp", headers, expect);
    }

    pub fn add_at(
        &mut self,
        name: impl Into<String>,
        path: &str,
        headers: Vec<(String, Vec<u8>)>,
        expect: Expect,
    ) {
        let name = name.into();
        assert!(
            !self.cases.iter().any(|c| c.name == name),
            "duplicate case name {name}"
        );
        self.cases.push(Case {
            name,
            path: path.to_string(),
            headers,
            expect,
        });
    }

    pub fn token(&mut self, name: impl Into<String>, token: &str, expect: Expect) {
        self.add(name, bearer_header(token), expect);
    }
}

/// What the categories start from, made once per corpus so that they all alter the same genuine
/// token.
pub struct Seeds {
    /// A genuine user token.
    pub good: String,
    /// The `kid` of the key that signs [`Forge`]'s tokens (the newer of the two published).
    pub kid: String,
    /// The time the cases' time claims are relative to.
    pub now: i64,
    /// A genuine token's claims as JSON text, for the cases that sign altered bytes.
    pub good_claims_text: String,
}

pub fn build_corpus(f: &Forge<'_>, attacker_url: &str) -> Corpus {
    let mut c = Corpus { cases: Vec::new() };
    let seeds = Seeds {
        good: f.good(),
        kid: f.kid.clone(),
        now: now(),
        good_claims_text: Value::Object(f.good_claims()).to_string(),
    };
    credentials::no_credentials_and_other_schemes(&mut c, &seeds);
    credentials::malformed_requests(&mut c, &seeds);
    structure::broken_structure(&mut c, f, &seeds);
    signature::algorithms(&mut c, f, &seeds);
    signature::key_ids(&mut c, f, &seeds);
    signature::keys_from_elsewhere(&mut c, f, &seeds, attacker_url);
    signature::crit_and_enc(&mut c, f);
    structure::header_and_payload_not_json_objects(&mut c, f, &seeds);
    structure::duplicate_names(&mut c, f, &seeds);
    structure::nesting_and_size(&mut c, f, &seeds);
    claims::malformed_claims(&mut c, f, &seeds);
    claims::wrong_scopes(&mut c, f);
    credentials::bytes_a_client_library_would_refuse(&mut c, &seeds);
    c
}
