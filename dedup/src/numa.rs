//! NUMA topology: how many nodes the host has, which node holds a page, and binding a pool's
//! memory to its node. [`HostTopology`] asks the kernel; [`FakeTopology`] pretends, for tests on
//! one-node machines.

use std::fmt::Debug;
use std::io;

use crate::slots::MAX_NODES;
use crate::sys;

/// Errors from topology queries.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// Reading the node list failed.
    #[error("reading the NUMA node list")]
    Nodes(#[source] io::Error),
    /// `move_pages` failed.
    #[error("querying page nodes")]
    Query(#[source] io::Error),
    /// `mbind` failed.
    #[error("binding pool memory to node {node}")]
    Bind {
        /// The node.
        node: u8,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Where memory lives.
pub trait Topology: Send + Sync + Debug {
    /// Number of nodes (node numbers are `0..count`, at most 16).
    fn node_count(&self) -> usize;
    /// Fills `out[i]` with the node of the page at host address `addrs[i]`.
    fn nodes_of(&self, addrs: &[usize], out: &mut [u8]) -> Result<(), TopologyError>;
    /// Binds the memory behind `[addr, addr + len)`, a shared mapping of a pool file, to `node`.
    fn bind(&self, node: u8, addr: usize, len: usize) -> Result<(), TopologyError>;
}

/// The host's real topology (`/sys/devices/system/node`, `move_pages`, `mbind`).
#[derive(Debug, Clone)]
pub struct HostTopology {
    nodes: usize,
}

impl HostTopology {
    /// Reads the host's online nodes.
    pub fn new() -> Result<Self, TopologyError> {
        let s = std::fs::read_to_string("/sys/devices/system/node/online");
        let nodes = match s {
            Ok(s) => parse_node_list(&s).map_or(1, |max| max + 1).min(MAX_NODES),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 1,
            Err(e) => return Err(TopologyError::Nodes(e)),
        };
        Ok(HostTopology { nodes })
    }
}

/// Highest node number in a kernel node list such as `0-3,5`.
fn parse_node_list(s: &str) -> Option<usize> {
    s.trim()
        .split(',')
        .filter_map(|part| part.rsplit('-').next()?.trim().parse::<usize>().ok())
        .max()
}

impl Topology for HostTopology {
    fn node_count(&self) -> usize {
        self.nodes
    }

    fn nodes_of(&self, addrs: &[usize], out: &mut [u8]) -> Result<(), TopologyError> {
        if self.nodes <= 1 {
            out.iter_mut().for_each(|n| *n = 0);
            return Ok(());
        }
        let mut status = vec![0i32; addrs.len()];
        sys::numa::page_nodes(addrs, &mut status).map_err(TopologyError::Query)?;
        for (o, s) in out.iter_mut().zip(status) {
            *o = u8::try_from(s).unwrap_or(0).min(MAX_NODES as u8 - 1);
        }
        Ok(())
    }

    fn bind(&self, node: u8, addr: usize, len: usize) -> Result<(), TopologyError> {
        if self.nodes <= 1 {
            return Ok(());
        }
        sys::numa::bind_to_node(addr, len, u32::from(node))
            .map_err(|source| TopologyError::Bind { node, source })
    }
}

/// A pretend topology: the host address space is cut in stripes of `stripe` bytes dealt to
/// `nodes` nodes in turn. Pools are not bound.
#[derive(Debug, Clone)]
pub struct FakeTopology {
    nodes: usize,
    stripe: usize,
}

impl FakeTopology {
    /// `nodes` nodes (1 to 16), stripes of `stripe` bytes (rounded up to a page).
    pub fn new(nodes: usize, stripe: usize) -> Self {
        FakeTopology {
            nodes: nodes.clamp(1, MAX_NODES),
            stripe: stripe.max(sys::PAGE_SIZE),
        }
    }

    /// The node of the page at `addr`.
    pub fn node_of(&self, addr: usize) -> u8 {
        ((addr / self.stripe) % self.nodes) as u8
    }
}

impl Topology for FakeTopology {
    fn node_count(&self) -> usize {
        self.nodes
    }

    fn nodes_of(&self, addrs: &[usize], out: &mut [u8]) -> Result<(), TopologyError> {
        for (o, &a) in out.iter_mut().zip(addrs) {
            *o = self.node_of(a);
        }
        Ok(())
    }

    fn bind(&self, _node: u8, _addr: usize, _len: usize) -> Result<(), TopologyError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_node_lists() {
        assert_eq!(parse_node_list("0\n"), Some(0));
        assert_eq!(parse_node_list("0-3,5"), Some(5));
        assert_eq!(parse_node_list("0-7"), Some(7));
        assert_eq!(parse_node_list(""), None);
    }

    #[test]
    fn host_topology_answers_for_own_pages() {
        let t = HostTopology::new().unwrap();
        assert!(t.node_count() >= 1);
        let v = vec![1u8; 3 * 4096];
        let addrs: Vec<usize> = (0..3).map(|i| v.as_ptr() as usize + i * 4096).collect();
        let mut out = [9u8; 3];
        t.nodes_of(&addrs, &mut out).unwrap();
        assert!(out.iter().all(|&n| usize::from(n) < t.node_count()));
    }

    #[test]
    fn fake_topology_stripes() {
        let t = FakeTopology::new(2, 8192);
        let mut out = [0u8; 4];
        t.nodes_of(&[0, 4096, 8192, 16384], &mut out).unwrap();
        assert_eq!(out, [0, 0, 1, 0]);
        assert_eq!(t.node_count(), 2);
    }
}
