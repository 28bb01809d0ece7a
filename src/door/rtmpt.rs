//! RTMPT/RTMPTS: the HTTP tunnel (open, send, idle, close) turned into one byte stream per session.
