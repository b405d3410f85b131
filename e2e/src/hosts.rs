//! Simulated hosts for the network-partition test: a Linux network namespace per "host",
//! joined to this machine by a veth pair, so that a link can be taken down under a running
//! service as a switch port would fail.
//!
//! The stack's broker and Redis listen on loopback only, and the broker advertises its
//! loopback address. So every stack port is relayed twice, by `socat` (Debian's): inside the
//! namespace from `127.0.0.1:port` over the veth to this side's `10.231.N.1:port`, and here
//! from there to `127.0.0.1:port`. A service in the namespace runs with the same addresses as
//! one outside; every byte it exchanges with the stack crosses the link. Needs root (`ip netns`),
//! as `scripts/test` runs.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

/// One simulated host: a network namespace, its veth link to this machine and the relays
/// that carry the stack's ports over that link. Torn down when dropped.
#[derive(Debug)]
pub struct NetHost {
    /// The namespace's name (`ip netns exec <ns> ...`).
    pub ns: String,
    /// This side of the link, the interface that [`NetHost::link_down`] takes down.
    link: String,
    /// This machine's address on the link; the namespace is `.2` of the same /30.
    here: String,
    /// The namespace's address on the link, where its services' HTTP ports are reached.
    pub addr: String,
    relays: Vec<Child>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running `ip` (iproute2; scripts/test installs it): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {} (the network-partition test needs root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl NetHost {
    /// Creates host number `index` (0..64): namespace `ctr-e2e-h<index>` on 10.231.<index>.0/30,
    /// replacing one a killed earlier run left behind.
    pub fn create(index: u8) -> Self {
        assert!(index < 64, "host index {index} out of range");
        let ns = format!("ctr-e2e-h{index}");
        let link = format!("ctr-e2e-h{index}");
        let peer = format!("ctr-e2e-h{index}p");
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &link]).output();
        let (here, addr) = (format!("10.231.{index}.1"), format!("10.231.{index}.2"));
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &link, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &ns]);
        ip(&["addr", "add", &format!("{here}/30"), "dev", &link]);
        ip(&["link", "set", &link, "up"]);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/30"),
            "dev",
            &peer,
        ]);
        ip(&["-n", &ns, "link", "set", &peer, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        Self {
            ns,
            link,
            here,
            addr,
            relays: Vec::new(),
        }
    }

    /// Carries loopback `port` of this machine into the namespace, over the link.
    pub fn relay(&mut self, port: u16) {
        let inside = self.spawn_socat(
            Some(&self.ns),
            &format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"),
            &format!("TCP:{}:{port}", self.here),
        );
        let outside = self.spawn_socat(
            None,
            &format!("TCP-LISTEN:{port},bind={},fork,reuseaddr", self.here),
            &format!("TCP:127.0.0.1:{port}"),
        );
        self.relays.extend([inside, outside]);
        // socat binds at once; give both a moment so the first connection finds them.
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    fn spawn_socat(&self, ns: Option<&str>, listen: &str, connect: &str) -> Child {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "socat"]);
                c
            }
            None => Command::new("socat"),
        };
        // Its own process group: the forked per-connection children go with it on drop.
        cmd.args([listen, connect])
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting socat (Debian's; scripts/test installs it): {e}"))
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Takes the link down: packets stop both ways, open connections hang (no reset).
    pub fn link_down(&self) {
        ip(&["link", "set", &self.link, "down"]);
    }

    /// Brings the link back up.
    pub fn link_up(&self) {
        ip(&["link", "set", &self.link, "up"]);
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        for r in &mut self.relays {
            let group = format!("-{}", r.id());
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &group])
                .status();
            let _ = r.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .output();
    }
}

/// The loopback ports of `addresses` (`host:port` items, comma-separated, optionally with a
/// `redis://` scheme and a trailing `/db`).
pub fn ports_of(addresses: &str) -> Vec<u16> {
    addresses
        .split(',')
        .filter_map(|a| {
            let a = a.trim();
            let a = a.split_once("://").map_or(a, |(_, rest)| rest);
            let a = a.split('/').next()?;
            a.rsplit_once(':')?.1.parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::ports_of;

    #[test]
    fn ports_are_read_from_broker_lists_and_redis_urls() {
        assert_eq!(ports_of("127.0.0.1:19092"), vec![19092]);
        assert_eq!(
            ports_of("127.0.0.1:1,127.0.0.1:2, 127.0.0.1:3"),
            vec![1, 2, 3]
        );
        assert_eq!(ports_of("redis://127.0.0.1:16379/"), vec![16379]);
        assert_eq!(ports_of("rediss://127.0.0.1:16380/0"), vec![16380]);
    }
}
