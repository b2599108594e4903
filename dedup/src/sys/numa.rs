//! NUMA system calls: which node holds a page (`move_pages` query) and binding memory to a node
//! (`mbind`).

use std::io;

use super::last_os_error;

/// Fills `nodes[i]` with the node of the page at `addrs[i]`, or a negative errno for pages that
/// are not present.
pub fn page_nodes(addrs: &[usize], nodes: &mut [i32]) -> io::Result<()> {
    if addrs.len() != nodes.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let pages: Vec<*mut libc::c_void> = addrs.iter().map(|&a| a as *mut libc::c_void).collect();
    // SAFETY: with a null `nodes` argument move_pages(2) only queries; `pages` and `nodes` are
    // arrays of `addrs.len()` elements, the status array is writable.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            pages.len() as libc::c_ulong,
            pages.as_ptr(),
            std::ptr::null::<i32>(),
            nodes.as_mut_ptr(),
            0,
        )
    };
    if rc < 0 {
        return Err(last_os_error());
    }
    Ok(())
}

/// Binds the memory of `[addr, addr + len)` (and, for a shared file mapping, the file's pages)
/// to `node`.
pub fn bind_to_node(addr: usize, len: usize, node: u32) -> io::Result<()> {
    const MAX_NODES: usize = 1024;
    if node as usize >= MAX_NODES {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut mask = [0u64; MAX_NODES / 64];
    mask[node as usize / 64] |= 1 << (node % 64);
    // SAFETY: mbind only changes the memory policy of our own mapping; `mask` holds MAX_NODES
    // bits as told by the `maxnode` argument.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len,
            libc::MPOL_BIND,
            mask.as_ptr(),
            MAX_NODES as libc::c_ulong,
            0,
        )
    };
    if rc != 0 {
        return Err(last_os_error());
    }
    Ok(())
}
