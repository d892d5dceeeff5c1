# Runs a haikutx tcl handler whose code is the first argument.
set haiku_code [lindex $argv 0]
set argv [lrange $argv 1 end]
set argc [llength $argv]
eval $haiku_code
