//! The NBD protocol for rootfork: wire format, request dispatcher and socket server.
