//! A connect the kernel must refuse (block size 8192 > PAGE_SIZE): the error is classified as
//! `Connect { Refused { EINVAL } }`, counted, and the slot is released, quiescent and claimable.

use rootfork_kernel::{AttachError, AttachOptions, NbdDispatcher, NlError};
use rootfork_nbd::ServeOptions;

use crate::common::{fresh_overlay, Env};

#[test]
#[ignore = "needs /dev/nbdN: run inside the test VM (tests/vm/kernel/run.sh)"]
fn invalid_connect_is_refused_and_releases_the_slot() {
    let env = Env::new();
    let d = NbdDispatcher::new(fresh_overlay("invalid"), ServeOptions::default());
    let opts = AttachOptions {
        sandbox: "invalid".into(),
        block_size: 8192,
        ..Default::default()
    };
    let index = match env.rt.block_on(env.at.attach(&d, &opts)) {
        Ok(a) => panic!(
            "the kernel accepted block size 8192 on {:?}",
            a.device_path()
        ),
        Err(AttachError::Connect {
            index,
            source: NlError::Refused { errno },
        }) if errno == libc::EINVAL => {
            println!("invalid connect on nbd{index} refused: errno {errno} (EINVAL)");
            index
        }
        Err(e) => panic!("unexpected error: {e:?}"),
    };
    let m = env.at.pool().metrics();
    assert_eq!(m.claimed, 0, "the slot is still claimed");
    assert_eq!(
        m.failures_by_errno.get(&libc::EINVAL),
        Some(&1),
        "failure not counted: {:?}",
        m.failures_by_errno
    );
    env.assert_quiescent(index);
    // And the slot can be claimed again.
    drop(env.at.pool().claim("after-invalid").expect("claim after"));
    env.finish();
}
