//! Which process holds which TCP socket, as `/proc` tells it: the kernel's table of IPv4 TCP
//! sockets (`/proc/net/tcp`: addresses, state, inode) joined with the socket inodes a process
//! has open (`/proc/PID/fd/N -> socket:[INODE]`).
//!
//! The scale run uses it twice: to see that each relay process it started is listening on the
//! shared port (with `SO_REUSEPORT`, a connect succeeds as soon as *any* of them listens), and
//! to tell which relay process a backend's mux link comes from (the backend sees the link's
//! peer address; the relay holding the socket with that local address is the one).

use std::collections::{BTreeSet, HashMap};
use std::io::BufRead;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// The `st` column of a listening socket (`TCP_LISTEN`).
pub const STATE_LISTEN: u8 = 0x0A;

/// The `st` column of an established connection (`TCP_ESTABLISHED`).
pub const STATE_ESTABLISHED: u8 = 0x01;

/// One row of `/proc/net/tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpEntry {
    /// This end's address.
    pub local: SocketAddr,
    /// The other end's address (`0.0.0.0:0` for a listener).
    pub remote: SocketAddr,
    /// TCP state (`STATE_LISTEN`, `STATE_ESTABLISHED`, ...).
    pub state: u8,
    /// The socket's inode, as `/proc/PID/fd` links name it (0 for sockets no file holds, e.g.
    /// in TIME_WAIT).
    pub inode: u64,
}

/// Parses one row of `/proc/net/tcp` (`sl local_address rem_address st ... inode ...`);
/// `None` for the header or anything malformed.
pub fn parse_tcp_line(line: &str) -> Option<TcpEntry> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    // sl, local, remote, st, tx:rx, tr:when, retrnsmt, uid, timeout, inode.
    if fields.len() < 10 || !fields[0].ends_with(':') {
        return None;
    }
    Some(TcpEntry {
        local: parse_v4_address(fields[1])?,
        remote: parse_v4_address(fields[2])?,
        state: u8::from_str_radix(fields[3], 16).ok()?,
        inode: fields[9].parse().ok()?,
    })
}

/// `0100007F:1F90` -> `127.0.0.1:8080`. The kernel prints the address as the 32-bit word it
/// holds in network order, read natively: its bytes in memory are the address's bytes.
fn parse_v4_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    if ip.len() != 8 {
        return None;
    }
    let word = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(word.to_ne_bytes()),
        port,
    )))
}

/// The rows of `/proc/net/tcp` that `keep` accepts, read line by line (with 200,000 sockets
/// the file is tens of MiB; only the rows asked for are kept).
pub fn tcp_sockets(keep: impl Fn(&TcpEntry) -> bool) -> std::io::Result<Vec<TcpEntry>> {
    let file = std::fs::File::open("/proc/net/tcp")?;
    let mut found = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        if let Some(entry) = parse_tcp_line(&line?)
            && keep(&entry)
        {
            found.push(entry);
        }
    }
    Ok(found)
}

/// The inodes of the sockets process `pid` has open (empty if it is gone or unreadable).
pub fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    entries
        .filter_map(|entry| {
            let target = std::fs::read_link(entry.ok()?.path()).ok()?;
            socket_inode(target.to_str()?)
        })
        .collect()
}

/// `socket:[12345]` -> 12345.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Whether process `pid` holds a socket listening on `port` (any address).
pub fn listens_on(pid: u32, port: u16) -> bool {
    let Ok(listeners) =
        tcp_sockets(|e| e.state == STATE_LISTEN && e.local.port() == port && e.inode != 0)
    else {
        return false;
    };
    let mine = socket_inodes(pid);
    listeners.iter().any(|e| mine.contains(&e.inode))
}

/// Which of `pids` holds each of `entries` (by inode): local address -> pid. Entries no one
/// of them holds are left out.
pub fn owners(entries: &[TcpEntry], pids: &[u32]) -> HashMap<SocketAddr, u32> {
    let by_inode: HashMap<u64, u32> = pids
        .iter()
        .flat_map(|&pid| {
            socket_inodes(pid)
                .into_iter()
                .map(move |inode| (inode, pid))
        })
        .collect();
    entries
        .iter()
        .filter_map(|e| Some((e.local, *by_inode.get(&e.inode)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rows_of_proc_net_tcp() {
        let header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";
        assert_eq!(parse_tcp_line(header), None);
        let listen = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0";
        let entry = parse_tcp_line(listen).unwrap();
        assert_eq!(entry.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(entry.remote, "0.0.0.0:0".parse().unwrap());
        assert_eq!(entry.state, STATE_LISTEN);
        assert_eq!(entry.inode, 4242);
        let link = "  17: 0200007F:D431 0100007F:2329 01 00000000:00000000 00:00000000 00000000  1000        0 987654 1 0000000000000000 20 4 30 10 -1";
        let entry = parse_tcp_line(link).unwrap();
        assert_eq!(entry.local, "127.0.0.2:54321".parse().unwrap());
        assert_eq!(entry.remote, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(entry.state, STATE_ESTABLISHED);
        assert_eq!(parse_tcp_line("   1: nonsense"), None);
    }

    #[test]
    fn reads_socket_links() {
        assert_eq!(socket_inode("socket:[123]"), Some(123));
        assert_eq!(socket_inode("pipe:[123]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn finds_its_own_listener_and_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let me = std::process::id();
        assert!(listens_on(me, addr.port()));
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (_server, _) = listener.accept().unwrap();
        let local = client.local_addr().unwrap();
        let entries = tcp_sockets(|e| e.remote == addr).unwrap();
        let owners = owners(&entries, &[me]);
        assert_eq!(owners.get(&local), Some(&me));
    }
}
