"""Read patches from every format users have, and pack them into a fast store."""
