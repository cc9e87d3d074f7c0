//! The generic netlink nbd family against the real kernel: `NBD_CMD_STATUS` of all devices and of
//! one, `NBD_CMD_RECONFIGURE` of a connected device, and `DISCONNECT` of an idle one.

use std::time::Duration;

use rootfork_kernel::netlink::{chain, NbdControl, ReconfigureRequest};
use rootfork_kernel::{AttachOptions, NbdDispatcher, NbdNetlink, NlError};
use rootfork_nbd::ServeOptions;

use crate::common::{fresh_overlay, Env};

#[test]
#[ignore = "needs /dev/nbdN: run inside the test VM (tests/vm/kernel/run.sh)"]
fn status_reconfigure_and_idle_disconnect() {
    let env = Env::new();
    let nl = NbdNetlink::open(Duration::from_secs(10)).expect("nbd netlink");
    let before = nl
        .status(None)
        .unwrap_or_else(|e| panic!("STATUS: {}", chain(&e)));
    assert!(
        before.len() >= 16 && !before.iter().any(|d| d.connected),
        "STATUS before: {before:?}"
    );
    let d = NbdDispatcher::new(fresh_overlay("netlink"), ServeOptions::default());
    let opts = AttachOptions {
        sandbox: "netlink".into(),
        ..Default::default()
    };
    let a = env.attach(&d, &opts);
    let idx = a.index();
    let one = nl
        .status(Some(idx))
        .unwrap_or_else(|e| panic!("STATUS nbd{idx}: {}", chain(&e)));
    let all = nl
        .status(None)
        .unwrap_or_else(|e| panic!("STATUS: {}", chain(&e)));
    let connected: Vec<u32> = all
        .iter()
        .filter(|d| d.connected)
        .map(|d| d.index)
        .collect();
    println!("STATUS nbd{idx}: {one:?}; connected: {connected:?}");
    assert!(
        one.len() == 1 && one[0].connected && connected == vec![idx],
        "STATUS does not show exactly the attached device connected"
    );
    let backend = env.at.pool().sysfs().slot(idx).expect("sysfs slot").backend;
    nl.reconfigure(&ReconfigureRequest {
        index: idx,
        timeout_secs: Some(60),
        backend_identifier: backend,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("RECONFIGURE: {}", chain(&e)));
    env.close(a);
    let after = nl
        .status(Some(idx))
        .unwrap_or_else(|e| panic!("STATUS after close: {}", chain(&e)));
    assert!(
        !after.iter().any(|d| d.connected),
        "STATUS after close: {after:?}"
    );
    // Disconnecting a device that is not connected is refused with a classified errno (6.1
    // accepts it).
    match nl.disconnect(idx) {
        Err(NlError::Refused { errno }) => {
            println!("DISCONNECT of an idle device refused: errno {errno}")
        }
        Ok(()) => println!("DISCONNECT of an idle device accepted"),
        Err(e) => panic!("DISCONNECT idle: {}", chain(&e)),
    }
    env.finish();
}
