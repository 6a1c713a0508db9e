/*
 * Test-only DSDT for acpiexec: declares \_SB.PCI0 as QEMU's DSDT does, with revision 1 so
 * integers are 32 bits wide, as in the real guests.
 */
DefinitionBlock ("", "DSDT", 1, "ACPIMN", "TESTDSDT", 1)
{
    Scope (\_SB)
    {
        Device (PCI0)
        {
            Name (_HID, EisaId ("PNP0A03"))
            Name (_BBN, Zero)
            Name (_UID, Zero)
        }
    }
}
