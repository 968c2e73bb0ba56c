use automerge::ReadDoc;
use cofab_protocol::model::{self, DesignInput, Splice};
use cofab_protocol::{Clock, Keypair};
use std::time::Instant;
fn main() {
    let kp = Keypair::from_secret([1; 32]);
    let (mut doc, _) = model::create_design(
        &kp,
        &DesignInput {
            title: "t".into(),
            ..Default::default()
        },
        0,
        0,
    )
    .unwrap();
    for n in [1000usize, 10000, 20000] {
        while doc.change_count() < n {
            let i = doc.change_count();
            model::splice_description(
                &mut doc,
                &kp,
                0,
                &Splice {
                    pos: i - 1,
                    delete: 0,
                    insert: "x".into(),
                },
            )
            .unwrap();
        }
        let t = Instant::now();
        for k in 0..100 {
            model::splice_description(
                &mut doc,
                &kp,
                0,
                &Splice {
                    pos: k,
                    delete: 0,
                    insert: "y".into(),
                },
            )
            .unwrap();
        }
        let edit = t.elapsed().as_micros() as f64 / 100.0;
        let mut their: Clock = doc.clock();
        *their.get_mut(&kp.author()).unwrap() -= 1;
        let t = Instant::now();
        for _ in 0..100 {
            let _ = doc.missing_for(&their, 1 << 20);
        }
        let miss = t.elapsed().as_micros() as f64 / 100.0;
        let t = Instant::now();
        for _ in 0..100 {
            let _ = doc.automerge().get_last_local_change();
        }
        let last = t.elapsed().as_micros() as f64 / 100.0;
        let t = Instant::now();
        for _ in 0..100 {
            let _ = doc.automerge().clone();
        }
        let clone = t.elapsed().as_micros() as f64 / 100.0;
        let h = doc.heads()[0];
        let t = Instant::now();
        for _ in 0..100 {
            let _ = doc.automerge().get_change_by_hash(&h);
        }
        let byhash = t.elapsed().as_micros() as f64 / 100.0;
        println!("n={n}: edit {edit:.0}us missing_for(1) {miss:.0}us last_local {last:.0}us clone {clone:.0}us by_hash {byhash:.0}us");
    }
}
