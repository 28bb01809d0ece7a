//! RTMPE at the door: runs the encrypted handshake and presents the client as plain RTMP.
