//! The HTTP API's JSON bodies: `serde_json` into `OrderInput`, `BidInput`,
//! `CapacityInput`, `DesignInput` and `Splice` (unknown fields refused), then their
//! validation and the typed edit the API would run. Never panics; what parses
//! serializes and parses back to the same value (where no float can lose a bit).
#![no_main]

use std::sync::OnceLock;

use cofab_protocol::model::{self, BidInput, CapacityInput, DesignInput, OrderInput, Splice};
use cofab_protocol::{Document, Keypair, Visibility};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_700_000_000_000;

fn key() -> &'static Keypair {
    static K: OnceLock<Keypair> = OnceLock::new();
    K.get_or_init(|| Keypair::from_secret([7; 32]))
}

fn order() -> &'static Document {
    static D: OnceLock<Document> = OnceLock::new();
    D.get_or_init(|| {
        let input = OrderInput { title: "Shaft".into(), quantity: 10, visibility: Visibility::Public, ..Default::default() };
        model::create_order(&Keypair::from_secret([1; 32]), &input, NOW, 1).unwrap().0
    })
}

fn design() -> &'static Document {
    static D: OnceLock<Document> = OnceLock::new();
    D.get_or_init(|| {
        let input = DesignInput { title: "Housing".into(), description: "héllo wörld".into(), ..Default::default() };
        model::create_design(key(), &input, NOW, 2).unwrap().0
    })
}

fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
    let s = serde_json::to_string(v).expect("serializes");
    let back: T = serde_json::from_str(&s).expect("what parsed parses again");
    assert_eq!(&back, v);
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    match which % 5 {
        0 => {
            if let Ok(o) = serde_json::from_slice::<OrderInput>(body) {
                let valid = o.validate().is_ok();
                let created = model::create_order(key(), &o, NOW, 3);
                assert_eq!(valid, created.is_ok() || matches!(created, Err(cofab_protocol::EditError::Invalid { field: "members", .. })), "validate() and create_order disagree: {created:?}");
                if let Ok((d, _)) = created {
                    let _ = model::order_view(&d);
                }
            }
        }
        1 => {
            if let Ok(b) = serde_json::from_slice::<BidInput>(body) {
                let mut d = order().clone();
                if model::place_bid(&mut d, key(), NOW, &b).is_ok() {
                    let _ = model::order_view(&d);
                }
            }
        }
        2 => {
            if let Ok(c) = serde_json::from_slice::<CapacityInput>(body) {
                let valid = c.validate().is_ok();
                let created = model::create_capacity(key(), &c, NOW, 4);
                assert_eq!(valid, created.is_ok(), "validate() and create_capacity disagree: {created:?}");
                if let Ok((d, _)) = created {
                    let _ = model::capacity_view(&d);
                }
            }
        }
        3 => {
            if let Ok(i) = serde_json::from_slice::<DesignInput>(body) {
                round_trip(&i);
                if let Ok((d, _)) = model::create_design(key(), &i, NOW, 5) {
                    let _ = model::design_view(&d);
                }
            }
        }
        _ => {
            if let Ok(s) = serde_json::from_slice::<Splice>(body) {
                round_trip(&s);
                let mut d = design().clone();
                if model::splice_description(&mut d, key(), NOW, &s).is_ok() {
                    let v = model::design_view(&d).expect("a design");
                    assert!(v.description.chars().count() <= "héllo wörld".chars().count() + s.insert.chars().count());
                }
            }
        }
    }
});
