//! The dm-clone language: table lines, status lines and messages, with the kernel's exact strings.
