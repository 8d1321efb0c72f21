use super::*;

fn key(c: u8) -> Vec<u8> {
    vec![c; MIN_KEY_LEN]
}

fn keys(ids: &[&str]) -> Keys {
    Keys::from_entries(ids.iter().map(|id| (*id, key(id.as_bytes()[0])))).unwrap()
}

#[test]
fn a_token_names_its_namespace_and_only_that_one() {
    let k = keys(&["k1"]);
    let a = k.sign("team-a").unwrap();
    assert!(a.starts_with("v1.k1.team-a."), "{a}");
    assert_eq!(k.verify(&a), Ok("team-a"));
    assert_ne!(a, k.sign("team-b").unwrap(), "one token per namespace");
    // The MAC of team-a under team-b's name: another namespace's token is forged.
    let mac = a.rsplit('.').next().unwrap();
    assert_eq!(
        k.verify(&format!("v1.k1.team-b.{mac}")),
        Err(Refused::BadSignature)
    );
}

#[test]
fn tokens_of_another_key_or_a_dropped_one_are_refused() {
    let old = keys(&["k1"]);
    let token = old.sign("team-a").unwrap();
    // Same id, other bytes: another cluster's key.
    let other = Keys::from_entries([("k1", key(b'z'))]).unwrap();
    assert_eq!(other.verify(&token), Err(Refused::BadSignature));
    // Rotation: both keys held, the new one signs, the old token still reads.
    let both = keys(&["k1", "k2"]);
    assert_eq!(both.signing_id(), "k2");
    assert!(both.sign("team-a").unwrap().starts_with("v1.k2."));
    assert_eq!(both.verify(&token), Ok("team-a"));
    // The old key dropped: its tokens are refused, the new ones read.
    let new = Keys::from_entries([("k2", key(b'k'))]).unwrap();
    assert_eq!(
        new.verify(&token),
        Err(Refused::UnknownKey("k1".to_owned()))
    );
    assert_eq!(new.verify(&both.sign("team-a").unwrap()), Ok("team-a"));
}

#[test]
fn garbage_is_refused_before_any_key_is_used() {
    let k = keys(&["k1"]);
    let good = k.sign("team-a").unwrap();
    let long = format!("v1.k1.team-a.{}", "A".repeat(MAX_LEN));
    for garbage in [
        "",
        "anonymous",
        "v1",
        "v1.k1.team-a",
        "v1.k1.team-a.",
        "v2.k1.team-a.AAAA",
        "v1.K1.team-a.AAAA",
        "v1.k1.Team-A.AAAA",
        "v1.k1.-team.AAAA",
        "v1.k1.team-a.AAAA.extra",
        "v1..team-a.AAAA",
        long.as_str(),
    ] {
        assert_eq!(k.verify(garbage), Err(Refused::Malformed), "{garbage:?}");
    }
    for bad_mac in [
        format!("{good}A"),
        good[..good.len() - 1].to_owned(),
        "v1.k1.team-a.not+base64/url".to_owned(),
        "v1.k1.team-a.AAAA".to_owned(),
    ] {
        assert_eq!(k.verify(&bad_mac), Err(Refused::BadSignature), "{bad_mac}");
    }
}

#[test]
fn keys_are_checked_when_loaded() {
    assert!(matches!(
        Keys::from_entries(Vec::<(String, Vec<u8>)>::new()),
        Err(KeyError::Empty)
    ));
    assert!(matches!(
        Keys::from_entries([("k1", vec![1; MIN_KEY_LEN - 1])]),
        Err(KeyError::Short(_))
    ));
    for id in ["", "K1", "k.1", "-k", &"k".repeat(64)] {
        assert!(
            matches!(
                Keys::from_entries([(id, key(b'a'))]),
                Err(KeyError::BadId(_))
            ),
            "{id:?}"
        );
    }
    let k = keys(&["k1"]);
    for ns in ["", "Team", "a.b", "a_b", "-a"] {
        assert!(
            matches!(k.sign(ns), Err(KeyError::BadNamespace(_))),
            "{ns:?}"
        );
    }
    assert_eq!(format!("{k:?}"), r#"Keys { ids: ["k1"] }"#, "never the key");
}

#[test]
fn keys_load_from_a_mounted_secret() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("k1"), [&key(b'a')[..], b"\n"].concat()).unwrap();
    std::fs::write(dir.path().join("k2"), key(b'b')).unwrap();
    // What a Secret volume holds beside its keys.
    std::fs::create_dir(dir.path().join("..2026_12_07")).unwrap();
    std::fs::write(dir.path().join("..data"), b"").unwrap();
    let k = Keys::from_dir(dir.path()).unwrap();
    assert_eq!(k.signing_id(), "k2");
    let token = Keys::from_entries([("k1", key(b'a'))])
        .unwrap()
        .sign("ns")
        .unwrap();
    assert_eq!(
        k.verify(&token),
        Ok("ns"),
        "the trailing newline is not key"
    );
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(Keys::from_dir(empty.path()), Err(KeyError::Empty)));
    assert!(matches!(
        Keys::from_dir(&empty.path().join("absent")),
        Err(KeyError::Io(_))
    ));
}

#[test]
fn the_token_is_read_from_what_each_client_sends() {
    let token = keys(&["k1"]).sign("team-a").unwrap();
    let basic = |user: &str, pass: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    };
    // On a read.
    assert_eq!(
        from_authorization(&format!("Bearer {token}")),
        Some(token.clone())
    );
    assert_eq!(
        from_authorization(&basic("kache", &token)),
        Some(token.clone())
    );
    assert_eq!(from_authorization(&basic("someone", &token)), None);
    assert_eq!(from_authorization("Basic !!!"), None);
    assert_eq!(from_authorization("Digest x"), None);
    assert_eq!(
        from_authorization(&format!("Bearer {}", "x".repeat(4 * MAX_LEN))),
        None
    );
    // At the token endpoint: containerd's form, containers/image's and Docker's Basic.
    let form = format!(
        "grant_type=password&username=kache&password={}&client_id=containerd-client&scope=repository%3Ax%3Apull",
        token.replace('-', "%2D")
    );
    assert_eq!(token_of_request(None, Some(&form)), Some(token.clone()));
    assert_eq!(
        token_of_request(Some(&basic("kache", &token)), None),
        Some(token.clone())
    );
    assert_eq!(
        token_of_request(Some(&basic("kache", "secret")), None),
        None
    );
    assert_eq!(token_of_request(None, Some("grant_type=password")), None);
    assert_eq!(token_of_request(None, None), None);
    assert_eq!(
        token_response(Some(&token)),
        format!(r#"{{"token":"{token}","access_token":"{token}","expires_in":3600}}"#)
    );
    assert_eq!(
        token_response(None),
        r#"{"token":"anonymous","access_token":"anonymous","expires_in":3600}"#
    );
}

#[test]
fn the_realm_is_the_host_the_client_used_unless_it_cannot_be_one() {
    for (given, used) in [
        (Some("localhost:7439"), "localhost:7439"),
        (Some("127.0.0.1:5000"), "127.0.0.1:5000"),
        (Some("[::1]:7439"), "[::1]:7439"),
        (None, "localhost:7439"),
        (Some(""), "localhost:7439"),
        (Some("evil\",x=\"y"), "localhost:7439"),
        (Some("a b"), "localhost:7439"),
    ] {
        assert_eq!(realm_host(given), used, "{given:?}");
    }
    let long = "a".repeat(256);
    assert_eq!(realm_host(Some(&long)), "localhost:7439");
}

#[test]
fn the_challenge_points_at_the_token_endpoint_of_the_address_used() {
    assert_eq!(
        challenge("localhost:7439", Some("docker.io/team/app")),
        r#"Bearer realm="http://localhost:7439/kache/token",service="kache",scope="repository:docker.io/team/app:pull""#
    );
    assert_eq!(
        challenge("127.0.0.1:5000", None),
        r#"Bearer realm="http://127.0.0.1:5000/kache/token",service="kache""#
    );
}
