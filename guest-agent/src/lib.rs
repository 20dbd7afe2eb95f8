//! The faultline guest agent. It will run inside a Linux guest, find hot and free
//! guest-physical ranges, report them to the host and pre-touch hot regions when postcopy
//! starts. Only the skeleton exists so far; the host side and the protocol come with their
//! own issue.
